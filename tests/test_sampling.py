"""Sampler behaviour: supports of top-k/top-p/min-p, per-request seeds, greedy, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import SamplingParams
from engine.sampler import filter_probs


@given(
    seed=st.integers(0, 2**16),
    top_k=st.integers(1, 50),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.5),
)
@settings(max_examples=60, deadline=None)
def test_filtered_probs_stay_inside_top_k_top_p_and_min_p(seed, top_k, top_p, min_p):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(3, 50, generator=g) * 3, -1)
    k = torch.full((3,), top_k)
    out = filter_probs(probs, k, torch.full((3,), top_p), torch.full((3,), min_p))
    assert torch.allclose(out.sum(-1), torch.ones(3))
    for row in range(3):
        kept = (out[row] > 0).nonzero().flatten()
        order = probs[row].argsort(descending=True)
        assert probs[row].argmax() in kept  # the most likely token always survives
        assert len(kept) <= top_k
        assert set(kept.tolist()) <= set(order[:top_k].tolist())
        # Tokens kept under top-p: the mass strictly above each kept token is below top_p.
        for t in kept.tolist():
            above = probs[row][probs[row] > probs[row][t]].sum()
            assert above < top_p + 1e-6
            assert probs[row][t] >= min_p * probs[row].max() - 1e-7


def test_a_tie_at_the_cut_off_survives_whole():
    # The sort's order among equal values must not decide which of them survive (the GPU kernels keep the tie too).
    probs = torch.tensor([[0.3, 0.2, 0.2, 0.2, 0.1]])
    off = torch.tensor([0.0])
    top_k2 = filter_probs(probs, torch.tensor([2]), torch.tensor([1.0]), off)
    top_p4 = filter_probs(probs, torch.tensor([5]), torch.tensor([0.4]), off)  # 0.3 of the mass lies above the tie
    for out in (top_k2, top_p4):
        assert (out[0] > 0).tolist() == [True, True, True, True, False]
        assert torch.allclose(out[0, :4], torch.tensor([0.3, 0.2, 0.2, 0.2]) / 0.9)
    top_p2 = filter_probs(probs, torch.tensor([5]), torch.tensor([0.3]), off)  # 0.3 above the tie: not under 0.3
    assert (top_p2[0] > 0).tolist() == [True, False, False, False, False]


def test_sampled_tokens_never_leave_the_top_k_support(qwen3_llm):
    prompt = [5, 6, 7, 8]
    greedy = qwen3_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[0]
    outs = qwen3_llm.generate([prompt] * 40, SamplingParams(temperature=5.0, top_k=1, max_tokens=1, ignore_eos=True))
    # top_k=1 at any temperature is greedy.
    assert all(o.token_ids == greedy.token_ids for o in outs)
    wide = qwen3_llm.generate([prompt] * 40, SamplingParams(temperature=5.0, max_tokens=1, ignore_eos=True, seed=None))
    assert len({o.token_ids[0] for o in wide}) > 1, "high temperature without top_k should vary"


def test_per_request_seed_reproduces_regardless_of_batch(qwen3_llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = qwen3_llm.generate([[9, 10, 11]], p)[0].token_ids
    crowd = qwen3_llm.generate(
        [[9, 10, 11], [4, 5], [7] * 20], [p, SamplingParams(temperature=1.0, max_tokens=12), p.model_copy()]
    )
    assert crowd[0].token_ids == alone
    other = qwen3_llm.generate([[9, 10, 11]], p.model_copy(update={"seed": 99}))[0].token_ids
    assert other != alone


def test_logprobs_include_the_sampled_token(qwen3_llm):
    out = qwen3_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) >= 3
        assert lp[tok] == pytest.approx(max(lp.values()))  # greedy picks the most likely


class _KernelSampler:
    """Stands for the CUDA sampler (engine/layers/sample.py) on the CPU: its token buffer, and greedy tokens."""

    def __init__(self):
        self.buffer = torch.full((8,), -1, dtype=torch.long)
        self.calls = 0
        self.plain = None  # whether the last call was the plain (greedy, no per-row settings) form

    def tokens(self, rows):
        return self.buffer[:rows]

    def __call__(self, logits, params=None, filtered=False, out=None):
        self.calls += 1
        self.plain = params is None
        return out.copy_(logits.argmax(-1))


def _sample_with_kernels(logits, params):
    from engine.request import Request
    from engine.sampler import Sampler

    sampler = Sampler(torch.device("cpu"), seed=0)
    sampler.fused = kernels = _KernelSampler()
    reqs = [Request([1, 2], params) for _ in range(logits.shape[0])]
    return kernels, *sampler.sample(logits, reqs, logits.shape[1], set())


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_come_beside_the_sampling_kernels_and_the_tokens_from_them(temperature):
    """A step whose rows ask for logprobs samples in the kernels (greedy: their plain form), into the buffer the
    CUDA graphs read the next step's inputs from, and takes the logprobs from a log-softmax of the same logits."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    kernels, ids, logprobs, wanted = _sample_with_kernels(logits, SamplingParams(temperature=temperature, logprobs=2))
    assert kernels.calls == 1 and kernels.plain == (temperature == 0.0)
    assert ids.data_ptr() == kernels.buffer.data_ptr()
    assert kernels.buffer.tolist() == logits.argmax(-1).tolist() + [-1] * 5
    torch.testing.assert_close(logprobs, torch.log_softmax(logits.float(), -1))
    assert wanted == [2, 2, 2]


def test_the_torch_samplers_tokens_go_where_the_cuda_graphs_read_the_next_inputs():
    """Steps the torch sampler serves (a filter on float32 logits) write their tokens into the kernels' token
    buffer too, so the next graph replay reads its input tokens there instead of patching them in."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    kernels, ids, _, _ = _sample_with_kernels(logits, SamplingParams(temperature=1.0, top_k=1))
    assert kernels.calls == 0 and ids.data_ptr() == kernels.buffer.data_ptr()
    assert kernels.buffer.tolist() == logits.argmax(-1).tolist() + [-1] * 5


@pytest.mark.parametrize("wanted", [[None, 0], [1, None], [1, 3]])
def test_logprob_tensors_give_each_rows_top_logprobs(wanted):
    """The sampled tokens' logprobs and the top-k (k = the most any row wants; max where k <= 1) match torch.topk."""
    from engine.sampler import log_probs, logprob_tensors

    logprobs = log_probs(torch.randn(2, 300, generator=torch.Generator().manual_seed(5)))
    tokens = torch.tensor([7, 123])
    chosen, top_vals, top_ids = logprob_tensors(logprobs, tokens, wanted)
    k = max(max(n or 0 for n in wanted), 1)
    expected_vals, expected_ids = logprobs.topk(k, dim=-1)
    assert top_ids.tolist() == expected_ids.tolist()
    torch.testing.assert_close(top_vals, expected_vals)
    torch.testing.assert_close(chosen, logprobs[[0, 1], tokens])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -3}, "top_k"),
        ({"stop": [1, 2]}, "stop"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_sampling_values_name_the_field(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**kwargs)


def test_min_tokens_holds_back_stop_tokens(qwen3_llm):
    greedy = qwen3_llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].token_ids
    stops = sorted(set(greedy[:4]))
    early = qwen3_llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=6, stop_token_ids=stops))[0]
    assert early.finish_reason == "stop" and len(early.token_ids) == 1
    held = qwen3_llm.generate(
        [[5, 6]], SamplingParams(temperature=0, max_tokens=6, min_tokens=4, stop_token_ids=stops)
    )[0]
    assert len(held.token_ids) >= 4
    assert not set(held.token_ids[:3]) & set(stops)
