"""Decode tok/s of one engine at several batch sizes (prompt 128 token ids, ignore_eos), for A/B runs of two code
trees in one call on one GPU: the tree's own `engine` is imported, so an older checkout's copy can be timed with
the same script.

Usage (on the GPU host, after `source .gpu-kit/setup.sh`):
    python benchmarks/decode_batches.py --label new --quantization fp8 --batches 8 32 64
    python benchmarks/decode_batches.py --tree /tmp/base --label base --quantization fp8 --batches 8 32 64
Prints one line per batch; writes the tree's benchmarks/results/decode_batches_<label>_<quantization>_<model>.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    """Build one engine from --tree and time its decode phase at each batch size (median of 3 runs)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default=str(Path(__file__).parent.parent), help="the checkout whose engine runs")
    parser.add_argument("--label", default="this", help="names the result (new, base, ...)")
    parser.add_argument("--quantization", choices=["none", "fp8"], default="none")
    parser.add_argument("--model", default="Qwen3-8B")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; ChatNanoVLLM's default is 0.7")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1, help="-1 is off")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=0, help="0: the largest of --batches")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    # The tree's model folders take their tokenizer from its tests/helpers.py (benchmarks/common.py).
    missing = [p for p in ("engine", "benchmarks/common.py", "tests/helpers.py") if not (tree / p).exists()]
    if missing:
        parser.error(
            f"--tree {tree} lacks {', '.join(missing)}; copy a checkout's engine, benchmarks and tests "
            "(git archive REV engine benchmarks tests | tar -x -C DIR)"
        )
    sys.path[:0] = [str(tree), str(tree / "benchmarks")]
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    from common import model_folder, write_result
    from gpu_bench import print_step_timing

    from engine import LLM, SamplingParams

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    kw = {} if args.quantization == "none" else {"quantization": args.quantization}
    seqs = args.max_num_seqs or max(args.batches)
    start = time.perf_counter()
    llm = LLM(folder, load_format="dummy", max_model_len=args.max_model_len, max_num_seqs=seqs, **kw)
    start_s = time.perf_counter() - start
    rows = []
    for batch in args.batches:
        rng = random.Random(0)
        prompts = [[rng.randrange(10, 30000) for _ in range(128)] for _ in range(batch)]
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            max_tokens=args.new_tokens,
            ignore_eos=True,
        )
        llm.generate(prompts, params)  # warm-up
        timing = llm.engine.step_timing  # NANOVLLM_STEP_TIMING: per-step host and device times of the runs below
        if timing is not None:
            timing.clear()
        runs = []
        for _ in range(3):
            outs = llm.generate(prompts, params)
            # Decode phase: from the last first token to the last finish (every request decodes throughout).
            first, last = max(o.first_token_time for o in outs), max(o.finish_time for o in outs)
            runs.append(batch * (args.new_tokens - 1) / (last - first))
        runs.sort()
        rows.append(dict(label=args.label, weights=args.quantization, model=args.model, batch=batch,
                         max_model_len=args.max_model_len, max_num_seqs=seqs,
                         temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                         decode_tok_s=runs[1], runs=runs))  # fmt: skip
        sampling = (
            f" temperature {args.temperature:g} top_p {args.top_p:g} top_k {args.top_k} min_p {args.min_p:g}"
            if args.temperature
            else ""
        )
        print(f"{args.label} {args.quantization} {args.model} batch {batch}{sampling}: {runs[1]:.1f} tok/s", flush=True)
        if timing:
            print_step_timing(llm, f"{args.label} batch {batch}")
    print(f"{args.label}: engine start-up {start_s:.1f} s")
    llm.shutdown()
    name = f"decode_batches_{args.label}_{args.quantization}_{args.model.lower()}"
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None  # the device tool's folder that comes back
    write_result(name, {"tree": str(tree), "start_s": start_s, "rows": rows}, out)


if __name__ == "__main__":
    main()
