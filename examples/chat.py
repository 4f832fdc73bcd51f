"""Stream a chat answer from the embedded default model (SmolLM2-135M-Instruct), token by token."""

from __future__ import annotations

import argparse
import logging
import sys

from engine import LLM, SamplingParams


def main() -> None:
    """Load the engine, stream one answer, print the memory report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("question", nargs="?", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--model", default=None, help="HF folder, Hub id or .gguf file (default: embedded)")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    llm = LLM(args.model, max_model_len=2048)
    print(f"> {args.question}")
    messages = [{"role": "user", "content": args.question}]
    for delta in llm.chat_stream(messages, SamplingParams(temperature=0.0, max_tokens=args.max_tokens)):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        if delta.finished:
            out = delta.output
            tokens = len(out.token_ids)
            secs = out.finish_time - out.first_token_time if tokens > 1 else 0.0
            rate = (tokens - 1) / secs if secs > 0 else float("nan")
            ttft = out.time_to_first_token
            print(f"\n[{tokens} tokens, finish={out.finish_reason}, ttft={ttft:.3f}s, {rate:.1f} tok/s]")
    mem = llm.memory()
    print("memory:", {k: (f"{v / 2**20:.0f} MiB" if isinstance(v, int) else v) for k, v in mem.items()})
    llm.shutdown()


if __name__ == "__main__":
    main()
