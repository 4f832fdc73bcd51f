"""Serve Prometheus metrics on 127.0.0.1:9400 while a few requests run, and print the memory report."""

from __future__ import annotations

import urllib.request

from langchain_nanovllm import ChatNanoVLLM


def main() -> None:
    """Start the endpoint through ChatNanoVLLM(metrics_port=...), run requests, show a scrape."""
    llm = ChatNanoVLLM(temperature=0.0, max_tokens=32, metrics_port=9400)
    llm.batch(["Hello!", "Name a planet.", "Hello!"])
    text = urllib.request.urlopen("http://127.0.0.1:9400/metrics").read().decode()
    wanted = ("nanovllm_generation_tokens_total", "nanovllm_kv_cache_usage_perc", "nanovllm_prefix_cache_hits_total")
    print("\n".join(line for line in text.splitlines() if line.startswith(wanted)))
    print("memory:", llm.llm.memory())


if __name__ == "__main__":
    main()
