"""The split-KV Triton decode kernel on the CPU, through Triton's interpreter (TRITON_INTERPRET=1), in float32.

Why: the kernel serves every small decode graph and cascade's own pages on the GPU, but its split rules, the merge
of the last program to arrive, the fused q/k norm + rope + append and the cascade states are logic that the
interpreter runs here, so CI catches a wrong index or merge before a GPU does. The interpreter's dot on bfloat16
tiles is wrong (docs/benchmarks.md, twenty-third session), so these run in float32; the GPU tests cover bf16.
Each runs in a fresh process: Triton reads TRITON_INTERPRET when it is first imported (its own library functions
are jitted then), so the variable must be set before anything in the process imports it.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _interpreter_runs_it() -> bool:
    # Triton 3.6's interpreter (the one torch 2.11 brings on the GPU host) fails on the kernel's page loop, whose
    # bounds are loaded values; 3.8's (`make setup` installs it) runs it.
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(x) for x in version.split(".")[:2]) >= (3, 8)


pytestmark = pytest.mark.skipif(not _interpreter_runs_it(), reason="needs Triton 3.8 or later (make setup)")

# (fewest pages per split, most pages in one split, no split shorter than the mean context): the engine's default,
# splits only, up to 2 pages in one split, and the large batches' Triton twins
SPLIT_RULES = [(1, 2, False), (1, 0, False), (2, 0, False), (1, 2, True)]


def run_interpreted(call: str, cases: list[tuple]) -> None:
    """call(*case, device="cpu", dtype=torch.float32) for each case, in a fresh process."""
    code = (
        "import torch\nimport triton_checks\n"
        f"for case in {cases!r}:\n"
        f"    triton_checks.{call}(*case, device='cpu', dtype=torch.float32)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    here = Path(__file__).parent
    done = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("min_pages,one_split,mean_chunk", SPLIT_RULES)
def test_split_decode_matches_torch_interpreted(min_pages, one_split, mean_chunk):
    cases = [
        ([40], 4, 2, 32, 16),  # three pages
        ([1, 17, 100], 4, 2, 32, 16),  # one token, a page and one, many pages
        ([50, 9], 6, 2, 16, 16),  # a group of 3 padded to a 16-row tile
    ]
    run_interpreted("check_split_decode", [(*c, min_pages, one_split, mean_chunk) for c in cases])


# The same rules with each split's first page loaded before the PDL wait (the default), the engine's default rule
# with it loaded after, and with 2 or 4 pages preloaded (a split of 3 pages then loads its third in the loop).
@pytest.mark.parametrize(
    "min_pages,one_split,mean_chunk,preload",
    [(*r, "1") for r in SPLIT_RULES] + [(1, 2, False, "0"), (1, 2, False, "2"), (3, 0, False, "2"), (1, 2, False, "4")],
)
def test_fused_split_decode_matches_separate_kernels_interpreted(min_pages, one_split, mean_chunk, preload):
    cases = [
        ([33, 16], 4, 2, 32, 16, True),  # the new token opens a page; it fills the last slot of one
        ([1, 70], 4, 2, 32, 16, False),  # a first token; many pages, no q/k norm
        ([49, 150], 4, 2, 32, 16, True),  # 4 pages with the new token first in its page; 10 pages
    ]
    run_interpreted("check_fused_split_decode", [(*c, min_pages, one_split, mean_chunk, preload) for c in cases])


def test_mean_chunk_splits_only_contexts_above_the_mean_interpreted():
    run_interpreted("check_mean_chunk_splits", [()])


def test_fp8_weights_in_every_row_tile_match_torch_interpreted():
    """FP8 weights through the one-row GEMV and the few-row kernel at each row tile the engine gives them (16-256
    rows, engine/layers/fp8.py) with float32 activations: the scale per output row, the rows past m masked, split-K
    sums, fused norm and SwiGLU, and a packed gate/up bias (each half added to its own rows)."""
    cases = [
        (1, 128, 1024, True, True, True),  # one row: the GEMV, norm and SwiGLU fused, with a bias
        (5, 128, 1024, True, False, False),  # 16-row tile: residual add + RMSNorm fused
        (20, 128, 1024, True, True, True),  # 32-row tile: norm and SwiGLU fused, with a bias
        (40, 192, 1024, False, False, True),  # 64 rows, a bias
        (100, 128, 2048, False, False, False),  # 128 rows
        (200, 128, 1024, False, False, False),  # 256 rows
    ]
    run_interpreted("check_fp8_rows", cases)


def test_multi_row_gemv_matches_torch_interpreted():
    """The one-row GEMV (with its first K step, several K steps or none loaded before the PDL wait) and its multi-row
    form for 2-4 token rows (engine/layers/gemv.py: gemv_multi_kernel) in float32: each row against its own torch
    reference, the third row of a 4-row tile masked, the residual add, norm, SwiGLU and a packed gate/up bias
    fused."""
    cases = [
        (1, 64, 2048, True, True, True, "1"),  # one row, the first K step preloaded: one or several K steps
        (1, 64, 3072, True, True, True, "all"),  # 1-6 K steps preloaded, 3 padded to 4, some left to the loop
        (1, 64, 2048, True, False, False, "0"),  # one row, not preloaded: residual add + norm
        (2, 64, 1024, True, True, True),  # norm, SwiGLU and bias: gate/up
        (3, 64, 2048, False, False, False),  # a padded row: o
        (4, 128, 1024, True, False, False),  # residual add + norm: qkv
    ]
    run_interpreted("check_multi_row_gemv", cases)


def test_fused_sampler_matches_torch_interpreted():
    """The sampling kernel (engine/layers/sample.py) in float32: greedy equals torch.argmax with ties across chunks,
    temperature draws follow softmax(logits / T), seeds reproduce and temperature-0 rows stay greedy."""
    # Seven chunks of 32 (the merge across chunks); then one chunk, with 600 draws for the distribution.
    run_interpreted("check_fused_sample", [(200, 32, 0), (24, 64, 600)])


def test_filtered_sampler_matches_torch_interpreted():
    """The top-k / top-p / min-p kernels (engine/layers/sample.py) in float16: the tokens they keep are exactly those
    torch's filter keeps, ties at the cut-off whole, across five chunks per row; draws follow torch's filtered
    distribution."""
    run_interpreted("check_filtered_sample", [(300, 64, 64, 150, 24)])


def test_graph_embedding_reads_the_sampled_tokens_interpreted():
    """The CUDA graphs' embedding kernel (engine/layers/embedding.py) takes a row's token from the sampler's buffer
    where its source row is set, else from the input ids, at a masked and at a looped hidden size."""
    run_interpreted("check_embed_sampled", [(96,), (4100,)])
