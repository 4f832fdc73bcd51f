"""The split-KV Triton decode kernel (engine/attention/triton_decode.py) against attention computed in torch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))

from triton_checks import (  # noqa: E402
    check_fused_split_decode,
    check_mean_chunk_splits,
    check_resident_programs,
    check_split_decode,
)

# (fewest pages per split, most pages in one split, no split shorter than the mean context): the engine's default,
# splits only, up to 8 pages in one split, and the large batches' Triton twins
SPLIT_RULES = [(1, 2, False), (1, 0, False), (8, 0, False), (1, 2, True)]
# The fused kernel's: each with its splits' first pages loaded before the PDL wait (the default), and the engine's
# default rule with them loaded after, or with 2 or 4 pages loaded before it (then splits of 8 pages load the rest
# in the loop).
FUSED_RULES = [(*rule, "1") for rule in SPLIT_RULES] + [
    (1, 2, False, "0"),
    (1, 2, False, "2"),
    (1, 2, False, "4"),
    (8, 0, False, "4"),
]


@pytest.mark.parametrize(
    "lens,hq,hkv,d,bs",
    [
        ([130], 16, 8, 128, 64),  # Qwen3-0.6B, one page and a bit
        ([1], 32, 8, 128, 64),  # one token
        ([5000], 32, 8, 128, 64),  # Qwen3-8B at a long context: many pages per split
        ([64, 700, 33, 4096], 32, 8, 64, 16),  # Llama-1B heads, 16-token pages, four rows
        ([300], 9, 3, 64, 64),  # SmolLM2: a group of 3 padded to a 16-row tile
    ],
)
@pytest.mark.parametrize("min_pages,one_split,mean_chunk", SPLIT_RULES)
def test_split_decode_matches_torch(lens, hq, hkv, d, bs, min_pages, one_split, mean_chunk):
    check_split_decode(lens, hq, hkv, d, bs, min_pages, one_split, mean_chunk)


@pytest.mark.parametrize(
    "lens,hq,hkv,d,bs,norm",
    [
        ([130], 16, 8, 128, 64, True),  # Qwen3-0.6B: the new token opens no page
        ([129], 16, 8, 128, 64, True),  # the new token is alone in its page
        ([1, 5000], 32, 8, 128, 64, True),  # a first token, and many pages per split
        ([64, 700, 33, 4096], 32, 8, 64, 16, False),  # Llama-1B heads (no q/k norm), 16-token pages
        ([300, 17], 9, 3, 64, 64, False),  # SmolLM2: a group of 3 padded to a 16-row tile
    ],
)
@pytest.mark.parametrize("min_pages,one_split,mean_chunk,preload", FUSED_RULES)
def test_fused_split_decode_matches_separate_kernels(
    lens, hq, hkv, d, bs, norm, min_pages, one_split, mean_chunk, preload
):
    check_fused_split_decode(lens, hq, hkv, d, bs, norm, min_pages, one_split, mean_chunk, preload)


def test_mean_chunk_splits_only_contexts_above_the_mean():
    check_mean_chunk_splits()


@pytest.mark.parametrize("hq,hkv,d", [(16, 8, 128), (32, 8, 64)])  # Qwen3-0.6B's heads, Llama-1B's
def test_resident_programs_follow_registers_and_shared_memory(hq, hkv, d):
    check_resident_programs(hq, hkv, d)


def test_graph_start_up_compiles_every_split_decode_configuration_ahead(tmp_path, monkeypatch):
    """GraphRunner.precompile_split_decode compiles, side by side, every configuration of the kernel that the graphs
    then time and record: none compiles later, so its notes carry the launches' exact arguments."""
    import torch
    from helpers import save_tiny_model, tiny_tokenizer

    from engine import LLM, SamplingParams
    from engine.attention import triton_decode
    from engine.cuda_graphs import GraphRunner

    def compiled() -> int:  # configurations in this process's kernel cache (Triton's own, on this device)
        return len(triton_decode._build_kernel().device_caches[torch.cuda.current_device()][0])

    folder = save_tiny_model("qwen3", tmp_path / "m", tokenizer_from=tiny_tokenizer(), hidden_size=256, head_dim=64)
    monkeypatch.setenv("NANOVLLM_COMPILE_THREADS", "4")
    triton_decode._build_kernel.cache_clear()  # a fresh kernel: nothing compiled for it in this process yet
    seen = {}
    precompile = GraphRunner.precompile_split_decode

    def spy(self):
        seen["noted"] = precompile(self)
        seen["compiled"] = compiled()
        return seen["noted"]

    monkeypatch.setattr(GraphRunner, "precompile_split_decode", spy)
    llm = LLM(folder, num_kvcache_blocks=256, max_num_seqs=16, max_model_len=512)
    try:
        # Batch sizes 1-8 split 32 or 16 ways; cascade graphs (8, 16) keep states: at least three configurations.
        assert seen["noted"] >= 3 and seen["compiled"] == seen["noted"]
        outs = llm.generate([[5, 6, 7]] * 3, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        assert all(len(o.token_ids) == 6 for o in outs) and llm.runner.graphs.replays["decode"] > 0
        assert compiled() == seen["compiled"]  # the timing, the recording and the steps compiled nothing more
    finally:
        llm.shutdown()
