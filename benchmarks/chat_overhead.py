"""What the LangChain layer costs: ChatNanoVLLM's invoke / stream / batch against the engine's own generate().

One engine and one chat model in this process; each round runs every variant in turn (the order reversed every
other round) on the same greedy request, so every variant decodes the same tokens. tok/s is output tokens over the
call's wall time (prompt rendering, prefill and the merge of the chunks included); each row's ratio is to the
engine's generate() of the same batch. Rows `as 2fd81f0` run ChatNanoVLLM as that commit had it (a delta and a chunk
per token, the chunks added one by one, batch() on LangChain's thread pool of min(32, cores + 4) threads, and a
streamed delta per token however many requests stream: stream_interval 1).

Usage: python benchmarks/chat_overhead.py [--model embedded|Qwen3-0.6B|...] [--new-tokens 256] [--batch 8]
  embedded: the embedded SmolLM2-135M GGUF (real weights: the answer may end before --new-tokens);
  a benchmark model name: random weights with its real shapes (load_format="dummy"; a GPU's job).
Prints a table; writes benchmarks/results/chat_overhead.json (chat_overhead_cpu.json on a machine without CUDA).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import operator
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from common import model_folder, print_table, write_result  # noqa: E402

OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None

QUESTION = "Write a long story about a lighthouse keeper who finds a map in a bottle."


def main() -> None:
    """Time each variant over the rounds and print / write the medians."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="requests of the batch rows (chat.batch / generate)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch
    from langchain_core.messages import HumanMessage
    from langchain_core.runnables.config import get_config_list

    from engine import LLM, SamplingParams
    from langchain_nanovllm import ChatNanoVLLM

    chat = ChatNanoVLLM(temperature=0.0, max_tokens=args.new_tokens, engine_kwargs={"max_num_seqs": args.batch})
    if args.model != "embedded":
        folder = model_folder(args.model, Path(tempfile.mkdtemp()))
        chat._llm = LLM(folder, load_format="dummy", max_model_len=4096, max_num_seqs=args.batch)
    llm = chat.llm
    msgs = [HumanMessage(QUESTION)]
    ids = chat._prepare(msgs, None, {})[0]
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)

    def engine(n):
        outs = llm.generate([ids] * n, params)
        return sum(len(o.token_ids) for o in outs)

    def invoke(n):
        return chat.invoke(msgs).usage_metadata["output_tokens"]

    result = ChatNanoVLLM._result

    def pairwise(chunks):
        return result([functools.reduce(operator.add, chunks)])

    @contextlib.contextmanager
    def as_before():
        """ChatNanoVLLM and the engine as 2fd81f0 had them (the module docstring says how)."""
        with (
            mock.patch.object(ChatNanoVLLM, "_per_token", staticmethod(lambda turn: True)),
            mock.patch.object(
                ChatNanoVLLM, "_result", staticmethod(lambda c: result([functools.reduce(operator.add, c)]))
            ),
            mock.patch.object(ChatNanoVLLM, "_batch_configs", lambda self, config, n: get_config_list(config, n)),
            mock.patch.object(llm.engine, "config", llm.engine.config.model_copy(update={"stream_interval": 1})),
        ):
            yield

    def before(fn):
        def run(n):
            with as_before():
                return fn(n)

        return run

    def stream(n):
        chunks = list(chat.stream(msgs))
        return chunks[-1].usage_metadata["output_tokens"]

    def batch(n):
        return sum(m.usage_metadata["output_tokens"] for m in chat.batch([msgs] * n))

    def abatch(n):
        return sum(m.usage_metadata["output_tokens"] for m in asyncio.run(chat.abatch([msgs] * n)))

    def streams(n):  # n threads, each streaming one answer
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            return sum(pool.map(lambda _: stream(1), range(n)))

    async def astreams(n):  # n tasks, each streaming one answer
        async def one():
            chunks = [c async for c in chat.astream(msgs)]
            return chunks[-1].usage_metadata["output_tokens"]

        return sum(await asyncio.gather(*(one() for _ in range(n))))

    def every(interval, fn):  # the engine's stream_interval for this call
        def run(n):
            config = llm.engine.config.model_copy(update={"stream_interval": interval})
            with mock.patch.object(llm.engine, "config", config):
                return fn(n)

        return run

    variants = [
        ("engine generate()", 1, engine),
        ("invoke", 1, invoke),
        ("invoke, as 2fd81f0", 1, before(invoke)),
        ("stream", 1, stream),
        ("engine generate()", args.batch, engine),
        ("batch", args.batch, batch),
        ("batch, as 2fd81f0", args.batch, before(batch)),
        ("abatch", args.batch, abatch),
        ("abatch, as 2fd81f0", args.batch, before(abatch)),
        ("stream, a thread each", args.batch, streams),
        ("stream, a thread each, stream_interval 1", args.batch, every(1, streams)),
        ("stream, a thread each, as 2fd81f0", args.batch, before(streams)),
        ("astream, a task each", args.batch, lambda n: asyncio.run(astreams(n))),
        ("astream, a task each, as 2fd81f0", args.batch, before(lambda n: asyncio.run(astreams(n)))),
    ]
    times: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    tokens: dict[int, int] = {}
    for _, n, fn in variants:
        fn(n)  # warm-up: compiles, fills the prefix cache
    for r in range(args.rounds):
        order = list(range(len(variants)))
        for i in order if r % 2 == 0 else order[::-1]:
            _, n, fn = variants[i]
            start = time.perf_counter()
            tokens[i] = fn(n)
            times[i].append(time.perf_counter() - start)
    rows = []
    base = {}
    for i, (name, n, _) in enumerate(variants):
        median = sorted(times[i])[len(times[i]) // 2]
        rate = tokens[i] / median
        base.setdefault(n, rate)  # each batch's engine row comes first
        rows.append(
            dict(
                variant=name,
                requests=n,
                output_tokens=tokens[i],
                median_ms=median * 1e3,
                tok_s=rate,
                over_engine=rate / base[n],
                rounds_ms=[round(t * 1e3, 2) for t in times[i]],
            )
        )
    title = f"{args.model}: ChatNanoVLLM against the engine, greedy, up to {args.new_tokens} new tokens"
    print_table(title, rows)
    name = "chat_overhead" if torch.cuda.is_available() else "chat_overhead_cpu"
    write_result(name, {"model": args.model, "new_tokens": args.new_tokens, "rows": rows}, OUT)
    llm.shutdown()


if __name__ == "__main__":
    main()
