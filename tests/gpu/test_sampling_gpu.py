"""On CUDA: the sampling kernel (engine/layers/sample.py) in bf16, and the engine sampling through it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))

import triton_checks  # noqa: E402
from helpers import save_tiny_model, tiny_tokenizer  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402


@pytest.mark.parametrize("vocab,block", [(151936, 4096), (1000, 64)])
def test_fused_sampler_matches_torch(vocab, block):
    triton_checks.check_fused_sample(vocab, block, 4000)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # head_dim 64: a size FlashInfer's prebuilt kernels serve.
    path = tmp_path_factory.mktemp("sample") / "m"
    return save_tiny_model("qwen3", path, tokenizer_from=tiny_tokenizer(), hidden_size=256, head_dim=64)


def _engine(folder, monkeypatch, fused: str) -> LLM:
    monkeypatch.setenv("NANOVLLM_FUSED_SAMPLE", fused)
    return LLM(folder, num_kvcache_blocks=256, max_num_seqs=8, max_model_len=512)


def test_greedy_tokens_match_torch_argmax_and_stop_tokens_wait_for_min_tokens(folder, monkeypatch):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [3]]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with_lp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    torch_llm = _engine(folder, monkeypatch, "0")
    try:
        assert torch_llm.runner.sampler.fused is None
        expected = [o.token_ids for o in torch_llm.generate(prompts, greedy)]
        torch_lp = torch_llm.generate([prompts[1]], with_lp)[0].logprobs
    finally:
        torch_llm.shutdown()
    llm = _engine(folder, monkeypatch, "1")
    try:
        assert llm.runner.sampler.fused is not None
        assert [o.token_ids for o in llm.generate(prompts, greedy)] == expected
        # Logprobs: the tokens still from the kernels, the logprobs from a log-softmax beside them, as torch's.
        outs = llm.generate(prompts, [greedy, with_lp, greedy])
        assert [o.token_ids for o in outs] == expected
        for token, lp, ref in zip(outs[1].token_ids, outs[1].logprobs, torch_lp):
            assert token in lp and lp[token] == pytest.approx(ref[token], abs=0.05)
        # min_tokens makes the step go through the kernel's sampling form with the stop token masked.
        first = expected[0][0]
        held = SamplingParams(temperature=0, max_tokens=4, min_tokens=3, stop_token_ids=[first])
        out = llm.generate([prompts[0]], held)[0].token_ids
        assert first not in out[:3] and len(out) >= 3, (first, out)
    finally:
        llm.shutdown()


def test_seeded_temperature_sampling_reproduces_regardless_of_batch(folder, monkeypatch):
    llm = _engine(folder, monkeypatch, "1")
    try:
        p = SamplingParams(temperature=0.8, max_tokens=16, seed=1234, ignore_eos=True)
        alone = llm.generate([[5, 6, 7]], p)[0].token_ids
        others = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
        batch = llm.generate([[9, 9, 9], [5, 6, 7], [4, 4]], [others, p, others])
        assert batch[1].token_ids == alone
        # Asking for logprobs does not change what a seeded request draws: its tokens still come from the kernels.
        assert llm.generate([[5, 6, 7]], p.model_copy(update={"logprobs": 1}))[0].token_ids == alone
        other_seed = llm.generate([[5, 6, 7]], p.model_copy(update={"seed": 99}))[0].token_ids
        assert other_seed != alone
        # Unseeded requests draw their own noise: eight of the same prompt do not all agree.
        free = llm.generate([[5, 6, 7]] * 8, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))
        assert len({tuple(o.token_ids) for o in free}) > 1
        assert all(0 <= t < 512 for o in free for t in o.token_ids)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("vocab,block,filter_block", [(151936, 4096, 2048), (1000, 64, 64)])
def test_filtered_sampler_matches_torch(vocab, block, filter_block):
    triton_checks.check_filtered_sample(vocab, block, filter_block, 4000, 2000)


def test_filtered_requests_sample_in_the_kernels_and_seeds_reproduce_regardless_of_batch(folder, monkeypatch):
    llm = _engine(folder, monkeypatch, "1")
    fused = llm.runner.sampler.fused
    calls = []

    def spy(logits, params=None, filtered=False, out=None):
        calls.append(filtered)
        return fused(logits, params, filtered, out)

    spy.tokens = fused.tokens  # the engine's token buffer, which the CUDA graphs read
    llm.runner.sampler.fused = spy
    try:
        p = SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.02, max_tokens=16, seed=7, ignore_eos=True)
        alone = llm.generate([[5, 6, 7]], p)[0].token_ids
        assert calls and all(calls), "top-k / top-p / min-p steps must take the filtered kernels"
        # In a batch with unfiltered rows, the seeded row's cut-offs and noise are its own.
        plain = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
        batch = llm.generate([[9, 9, 9], [5, 6, 7], [4, 4]], [plain, p, plain])
        assert batch[1].token_ids == alone
        # Asking for logprobs does not change what a seeded request draws: its tokens still come from the kernels.
        assert llm.generate([[5, 6, 7]], p.model_copy(update={"logprobs": 1}))[0].token_ids == alone
    finally:
        llm.shutdown()
