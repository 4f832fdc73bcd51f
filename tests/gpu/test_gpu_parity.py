"""bf16 on the GPU: engine logits (FlashInfer, CUDA graphs, cascade) match HF transformers on the same weights."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from helpers import load_fp8_weights_into_hf, tiny_tokenizer  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402

TOL = 2e-2
# FP8 activations against HF on the FP8 weights: quantizing each projection's input per token cost 9.2-9.6e-2
# (Qwen3-shaped) and 1.37-1.49e-1 (Llama-shaped) over these 4 layers (H200), about what FP8 weights cost against
# the unquantized ones (11-16%).
FP8_ACT_TOL = 0.25
LAYERS = 4  # real layer widths, fewer layers: the kernels and layouts are what is under test


def qwen3_06b_shape():
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=LAYERS,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
    )  # fmt: skip


def llama_1b_shape():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=LAYERS,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model_dir(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    cfg = qwen3_06b_shape() if request.param == "qwen3" else llama_1b_shape()
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    hf.eval()
    return folder, hf


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def engine_logits(llm: LLM, prompts, params) -> tuple[list, dict]:
    """Run prompts; return outputs and, per request, {sequence length -> logits row}."""
    sink: list = []
    llm.runner.logits_sink = sink
    try:
        outs = llm.generate(prompts, params)
    finally:
        llm.runner.logits_sink = None
    rows: dict = {}
    for ids, lens, logits in sink:
        for rid, n, row in zip(ids, lens, logits):
            rows.setdefault(rid, {})[n] = row
    return outs, rows


# (HF model, its fp32 copy) of the model last asked for. Held by the model itself, not its id(): once a model
# fixture's model is freed, the next one may get its id, and would be compared with the other model's copy.
_fp32_ref: list = []


def fp32_reference(hf):
    """HF in fp32 on the same (bf16-valued) weights: the higher-precision reference both bf16 paths approximate."""
    if not _fp32_ref or _fp32_ref[0][0] is not hf:
        import copy

        _fp32_ref.clear()  # the previous copy goes before the next is made
        _fp32_ref.append((hf, copy.deepcopy(hf).float()))
    return _fp32_ref[0][1]


def check_against_hf(hf, prompts, outs, rows, ref_model=None, tol=TOL) -> float:
    """Teacher-forced: HF logits over prompt + engine tokens vs the engine's logits at every step (HF in fp32 on
    hf's weights, or ref_model when given); returns the worst relative error, which must be under tol."""
    worst = 0.0
    ref_model = ref_model if ref_model is not None else fp32_reference(hf)
    for p, o in zip(prompts, outs):
        seq = torch.tensor([p + o.token_ids], device="cuda")
        with torch.no_grad():
            ref = ref_model(seq).logits[0].float().cpu()
        got = rows[o.request_id]
        for n, row in got.items():
            worst = max(worst, rel_err(row, ref[n - 1]))
    assert worst < tol, f"relative error {worst:.3e} >= {tol}"
    return worst


def make_prompts(lengths, seed=0, prefix=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(10, 30000, (prefix,), generator=g).tolist()
    return [shared + torch.randint(10, 30000, (n,), generator=g).tolist() for n in lengths]


def compare_while_equal(prompts, o1, r1, o2, r2, tol: float) -> int:
    """Logits of two runs agree within tol at every step where both have produced the same tokens so far
    (random weights have near-ties, so greedy paths may split); returns how many rows were compared."""
    compared = 0
    for p, a, b in zip(prompts, o1, o2):
        same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        for n in range(len(p), len(p) + same + 1):
            if n in r1[a.request_id] and n in r2[b.request_id]:
                err = rel_err(r1[a.request_id][n], r2[b.request_id][n])
                assert err < tol, f"request {a.request_id} at length {n}: relative error {err:.3e}"
                compared += 1
    return compared


GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_mixed_lengths_prefix_hits_and_graphs_match_hf(model_dir):
    folder, hf = model_dir
    llm = LLM(folder, num_kvcache_blocks=2048, max_model_len=4096, max_num_seqs=32)
    try:
        assert llm.attention_backend == "flashinfer" and llm.runner.graphs is not None
        prompts = make_prompts([1, 7, 16, 33, 100, 257, 500, 1000], prefix=48)
        outs, rows = engine_logits(llm, prompts, GREEDY)
        check_against_hf(hf, prompts, outs, rows)
        again, rows2 = engine_logits(llm, prompts, GREEDY)
        assert sum(o.num_cached_tokens for o in again) >= 8 * 48
        check_against_hf(hf, prompts, again, rows2)
        # A cached prompt plus a short question: a small prefill step, served by a prefill CUDA graph.
        before = llm.runner.graphs.replays["prefill"]
        follow = [prompts[6] + make_prompts([20], seed=9)[0], prompts[7][:300] + make_prompts([3], seed=8)[0]]
        outs3, rows3 = engine_logits(llm, follow, GREEDY)
        bs = llm.config.block_size
        assert [o.num_cached_tokens for o in outs3] == [len(prompts[6]) // bs * bs, 300 // bs * bs]
        assert llm.runner.graphs.replays["prefill"] > before
        check_against_hf(hf, follow, outs3, rows3)
    finally:
        llm.shutdown()


def test_eager_prefill_kernel_choice_matches_hf(model_dir, monkeypatch):
    """Many short requests over a cached prefix prefill in one eager step on FlashInfer's fa2 kernel (fa3's query
    tiles would be mostly idle), a long prompt on the default one; both match HF."""
    folder, hf = model_dir
    monkeypatch.setenv("NANOVLLM_LARGE_PREFILL_GRAPHS", "0")  # the 700-token prompt runs eagerly
    llm = LLM(folder, num_kvcache_blocks=2048, max_model_len=4096, max_num_seqs=32)
    try:
        steps = llm.runner.backend.prefill_steps
        prefix = make_prompts([256], seed=3)[0]
        llm.generate([prefix + [5]], SamplingParams(max_tokens=1))  # the prefix enters the cache
        prompts = [prefix + p for p in make_prompts([40] * 24, seed=4)]  # 24 x 40 new tokens: an eager step
        fa2, auto = steps["fa2"], steps["auto"]
        outs, rows = engine_logits(llm, prompts, GREEDY)
        assert [o.num_cached_tokens for o in outs] == [256] * 24
        assert steps["fa2"] == fa2 + 1 and steps["auto"] == auto
        check_against_hf(hf, prompts, outs, rows)
        long = make_prompts([700], seed=5)
        outs, rows = engine_logits(llm, long, GREEDY)
        assert steps["auto"] == auto + 1 and steps["fa2"] == fa2 + 1
        check_against_hf(hf, long, outs, rows)
    finally:
        llm.shutdown()


def test_large_prefill_graphs_match_hf(model_dir, monkeypatch):
    """Steps of 513-4,096 tokens replay the large prefill graphs (fa3 attention on sm90, padded to the next
    captured size): one long prompt, two prompts in one step, and a long continuation of a cached prefix (its
    queries start past the cached pages); all match HF."""
    folder, hf = model_dir
    monkeypatch.setenv("NANOVLLM_LARGE_PREFILL_GRAPHS", "1")  # every large size, whatever this host measures
    llm = LLM(folder, num_kvcache_blocks=2048, max_model_len=4096, max_num_seqs=32)
    try:
        graphs = llm.runner.graphs
        assert graphs.large_prefill_sizes == [768, 1024, 1536, 2048, 3072, 4096]
        prefix = make_prompts([640], seed=21)[0]
        cases = [  # (prompts, the graph size of their first step, cached tokens of the first prompt)
            (make_prompts([700], seed=20), 768, 0),
            (make_prompts([300, 900], seed=22), 1536, 0),
            ([prefix], 768, 0),  # 640 new tokens; its 10 whole pages enter the cache
            ([prefix + make_prompts([1900], seed=23)[0]], 2048, 640),  # 1,900 new tokens after 640 cached
            (make_prompts([3500], seed=24), 4096, 0),
        ]
        for prompts, size, cached in cases:
            before = graphs.prefill_replays.get(size, 0)
            outs, rows = engine_logits(llm, prompts, GREEDY)
            assert graphs.prefill_replays.get(size, 0) == before + 1, (size, graphs.prefill_replays)
            assert outs[0].num_cached_tokens == cached
            check_against_hf(hf, prompts, outs, rows)
    finally:
        llm.shutdown()


def test_eager_prefill_step_is_timed_for_the_large_graph_rule(model_dir, monkeypatch):
    """In "auto" mode an eager prefill step that a large graph could have served is timed on the device, and the
    next step's choice reads its span (once it has ended): how many times longer than its launch and its kernels
    it kept the device. Its logits match HF."""
    folder, hf = model_dir
    monkeypatch.setenv("NANOVLLM_LARGE_PREFILL_GRAPHS", "auto")
    llm = LLM(folder, num_kvcache_blocks=2048, max_model_len=4096, max_num_seqs=32)
    try:
        graphs = llm.runner.graphs
        assert sorted(graphs.large_replay_ms) == graphs.large_prefill_sizes
        assert all(ms > 0 for ms in graphs.large_replay_ms.values())
        graphs.eager_launch_ms = 0.0  # as if this host launched instantly: the 700-token step runs eagerly
        prompts = make_prompts([700], seed=25)
        before = graphs.prefill_replays.get(768, 0)
        outs, rows = engine_logits(llm, prompts, GREEDY)
        assert graphs.prefill_replays.get(768, 0) == before
        start, end, launch_ms, tokens = graphs._eager_timed
        assert tokens == 700 and launch_ms == graphs._launches[-1] > 0
        assert graphs.eager_launch_ms == statistics.median(graphs._launches)  # the start-up launch counts too
        span = start.elapsed_time(end)  # the step was collected: its end event has been reached
        assert span > 0
        graphs.prefill_size(700, 1)
        assert graphs._eager_timed is None
        bound = max(launch_ms, graphs.device_pace * graphs.kernel_ms(700))
        assert graphs._excesses[-1] == max(1.0, span / bound)
        assert graphs.eager_excess == statistics.median(graphs._excesses)
        # A step on a large graph is timed too: its span against the start-up replay is the device's pace.
        graphs.eager_launch_ms = float("inf")  # the 1,000-token step takes its graph, whatever this host measured
        outs2, rows2 = engine_logits(llm, make_prompts([1000], seed=26), GREEDY)
        start, end, t = graphs._graph_timed
        assert t == 1024 and graphs.prefill_replays[1024] >= 1
        graphs.prefill_size(700, 1)
        assert graphs._paces[-1] == max(0.5, start.elapsed_time(end) / graphs.large_replay_ms[1024]) > 0.5
        assert graphs.device_pace == statistics.median(graphs._paces)
        check_against_hf(hf, prompts, outs, rows)
        check_against_hf(hf, make_prompts([1000], seed=26), outs2, rows2)
    finally:
        llm.shutdown()


class CountedCalls:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_prefill_graph_of_a_repeated_shape_keeps_its_plan_and_matches_hf(model_dir):
    """Two cached documents of one length, then each with a question of one length, one request at a time: the
    second warm step has the first's shape, so its prefill graph keeps the first's FlashInfer plan and only the
    page ids change (another document's pages); both match HF."""
    folder, hf = model_dir
    llm = LLM(folder, num_kvcache_blocks=2048, max_model_len=4096, max_num_seqs=32)
    try:
        graphs = llm.runner.graphs
        docs = make_prompts([256, 256], seed=3)
        llm.generate(docs, SamplingParams(temperature=0, max_tokens=1))
        plans = {t: CountedCalls(attn.prefill.plan) for t, attn in graphs.prefill_attn.items()}
        for t, counted in plans.items():
            graphs.prefill_attn[t].prefill.plan = counted
        follow = [d + q for d, q in zip(docs, make_prompts([20, 20], seed=4), strict=True)]
        before = graphs.replays["prefill"]
        outs, rows = [], {}
        for prompt in follow:
            o, r = engine_logits(llm, [prompt], GREEDY)
            outs += o
            rows.update(r)
        assert [o.num_cached_tokens for o in outs] == [256, 256]
        assert graphs.replays["prefill"] == before + 2  # one warm prefill graph step per request
        assert sum(c.calls for c in plans.values()) == 1  # the second step kept the first's plan
        check_against_hf(hf, follow, outs, rows)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("size", [16, 64])
def test_unsplit_and_split_decode_graphs_match_hf(model_dir, size):
    """`size` requests of similar length decode through the unsplit (whole-KV) graph, `size` with one long context
    among short ones through the split-KV graph of the same size; both match HF. At 16 requests the split graph is
    the size's own (FlashInfer) and the unsplit one its twin; at 64 the unsplit graph is its own and the twin
    attends with the Triton split-KV kernel, which also takes steps whose mean context is short
    (short_decode_pays), with no split shorter than that mean."""
    folder, hf = model_dir
    llm = LLM(folder, num_kvcache_blocks=3072, max_model_len=4096, max_num_seqs=size)
    try:
        graphs = llm.runner.graphs
        own, twin = graphs.decode_attn[size], graphs.twin_attn[size]
        assert own.whole_kv == (size >= 64) and twin.whole_kv != own.whole_kv
        assert (twin.split_decode is not None) == (size >= 64) and own.split_decode is None
        whole_key = ("decode", size) if own.whole_kv else ("decode", size, "whole_kv")
        split_key = ("decode", size, "split") if own.whole_kv else ("decode", size)
        limit, most = graphs.short_limits.get(size, graphs.short_decode)
        assert 250 <= limit <= 2000 and most >= size  # the batches below sit either side of it
        if size >= 64:
            assert twin.split_decode.mean_chunk
        cases = [
            # similar and short (mean ~125 tokens): unsplit at 16, the Triton twin at 64
            (make_prompts([30 + 3 * i for i in range(size)], seed=11), split_key if own.whole_kv else whole_key),
            (make_prompts([limit + 3 * i for i in range(size)], seed=13), whole_key),  # similar, mean above the limit
            (make_prompts([2000] + [20 + i for i in range(size - 1)], seed=12), split_key),  # one long among short
        ]
        for batch, key in cases:
            graphs.planned.clear()
            outs, rows = engine_logits(llm, batch, GREEDY)
            assert key in graphs.planned and len([k for k in graphs.planned if k[:2] == ("decode", size)]) == 1
            check_against_hf(hf, batch, outs, rows)
    finally:
        llm.shutdown()


def test_chunked_prefill_matches_hf(model_dir):
    folder, hf = model_dir
    # 16-token blocks here (the default on this path is 64), so both page sizes meet HF.
    llm = LLM(
        folder, num_kvcache_blocks=1024, max_model_len=2048, max_num_batched_tokens=96, max_num_seqs=8, block_size=16
    )
    try:
        prompts = make_prompts([300, 50, 700], seed=1)
        outs, rows = engine_logits(llm, prompts, GREEDY)
        check_against_hf(hf, prompts, outs, rows)
    finally:
        llm.shutdown()


def test_cuda_graphs_equal_eager(model_dir):
    folder, _ = model_dir
    prompts = make_prompts([5, 60, 130, 9, 300], seed=2)
    results = []
    for eager in (False, True):
        llm = LLM(folder, num_kvcache_blocks=1024, max_model_len=2048, max_num_seqs=16, enforce_eager=eager)
        try:
            assert (llm.runner.graphs is None) == eager
            results.append(engine_logits(llm, prompts, GREEDY))
        finally:
            llm.shutdown()
    (o1, r1), (o2, r2) = results
    # Graph and eager prefill use different FlashInfer kernels (fa2 with split-KV vs the eager planner's choice),
    # so logits agree to bf16 tolerance rather than bit for bit.
    assert compare_while_equal(prompts, o1, r1, o2, r2, TOL) >= len(prompts)


def test_cascade_on_and_off_agree_and_match_hf(model_dir):
    folder, hf = model_dir
    prompts = make_prompts([20] * 10, seed=3, prefix=512)
    results = []
    # Cascade in a CUDA graph, cascade eager, and plain decode graphs.
    for cascade, eager in ((True, False), (True, True), (False, False)):
        llm = LLM(
            folder,
            num_kvcache_blocks=2048,
            max_model_len=2048,
            max_num_seqs=16,
            enable_cascade_attention=cascade,
            cascade_min_shared_tokens=1,  # the defaults want 1,024 shared tokens and 16,384 tokens x requests
            cascade_min_prefix_tokens=256,
            enforce_eager=eager,
        )
        try:
            llm.generate([prompts[0][:520]], SamplingParams(max_tokens=1))  # warm the prefix cache
            results.append(engine_logits(llm, prompts, GREEDY))
            steps = llm.stats()["num_cascade_steps"]
            assert (steps > 0) == cascade
            if cascade and not eager:
                assert llm.runner.graphs.replays["cascade"] > 0
        finally:
            llm.shutdown()
    for outs, rows in results:
        check_against_hf(hf, prompts, outs, rows)
    o2, r2 = results[-1]
    for o1, r1 in results[:-1]:
        assert compare_while_equal(prompts, o1, r1, o2, r2, TOL) >= len(prompts)


def test_one_row_triton_kernels_match_hf(model_dir, monkeypatch):
    """Batch-1 decode through the Triton kernels (fused GEMVs forced for every role, split-KV attention with its
    merge inside) matches HF, and the FlashInfer + cuBLAS path; with and without programmatic dependent launch
    (each Triton kernel waits for the one before, the GEMVs prefetch their weights first)."""
    folder, hf = model_dir
    prompts = make_prompts([40], seed=4)
    results = []
    for gemv, attn_rows, pdl in (("force", "8", "1"), ("force", "8", "0"), ("0", "0", "1")):
        monkeypatch.setenv("NANOVLLM_GEMV", gemv)
        monkeypatch.setenv("NANOVLLM_TRITON_DECODE_MAX_ROWS", attn_rows)
        monkeypatch.setenv("NANOVLLM_PDL", pdl)
        llm = LLM(folder, num_kvcache_blocks=256, max_model_len=1024, max_num_seqs=16)
        try:
            plan = llm.runner.model.layers[0].gemv_plan
            assert (plan and all(plan.values())) if gemv == "force" else not plan
            for size, attn in llm.runner.graphs.decode_attn.items():
                assert (attn.split_decode is not None) == (size <= int(attn_rows))
            before = llm.runner.graphs.replays["decode"]
            results.append(engine_logits(llm, prompts, GREEDY))
            assert llm.runner.graphs.replays["decode"] > before  # the batch-1 steps ran as graphs
        finally:
            llm.shutdown()
    for outs, rows in results:
        check_against_hf(hf, prompts, outs, rows)
    (o1, r1), (o_plain, r_plain), (o2, r2) = results
    # PDL changes when kernels start, never what they compute: the same kernels give the same logits.
    assert [o.token_ids for o in o1] == [o.token_ids for o in o_plain]
    for a, b in zip(o1, o_plain, strict=True):
        steps_a, steps_b = r1[a.request_id], r_plain[b.request_id]
        assert steps_a.keys() == steps_b.keys()
        assert all(torch.equal(steps_a[n], steps_b[n]) for n in steps_a)
    assert compare_while_equal(prompts, o1, r1, o2, r2, TOL) >= GREEDY.max_tokens // 2


def test_step_timed_gemv_choice_matches_hf(model_dir, monkeypatch):
    """The one-row GEMV choice timed in the decode step graph (GraphRunner.refine_row_plan) picks among the given
    alternatives, runs on the scratch page only, and leaves an engine whose decode matches HF."""
    from engine.cuda_graphs import LAST_LEN, ROPE_POS
    from engine.layers.gemv import ROLES, configs_for

    folder, hf = model_dir
    prompts = make_prompts([40], seed=7)
    monkeypatch.setenv("NANOVLLM_GEMV", "force")  # every role on the Triton GEMV, the first configuration
    llm = LLM(folder, num_kvcache_blocks=256, max_model_len=1024, max_num_seqs=16)
    try:
        model, graphs = llm.runner.model, llm.runner.graphs
        layer = model.layers[0]
        shapes = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj, "down": layer.mlp.down_proj}
        alternatives = {}
        for role in ROLES:
            w = shapes[role].weight if role in shapes else layer.mlp.gate_up_proj.weight
            n = w.shape[0] // 2 if role == "gate_up" else w.shape[0]
            alternatives[role] = configs_for(n, w.shape[1])[:3]
        assert all(len(c) > 1 for c in alternatives.values())
        model.gemv_alternatives = alternatives
        cache_before = llm.runner.kv_cache_storage.clone()
        graphs.capture()  # refines the plan, then records every graph again
        plan = layer.gemv_plan
        assert all(plan[role] in alternatives[role] for role in ROLES)
        assert all(lay.gemv_plan is plan for lay in model.layers)
        assert graphs.static[LAST_LEN, 0] == 1 and graphs.static[ROPE_POS, 0] == 0  # padding state back
        diff = (llm.runner.kv_cache_storage != cache_before).transpose(0, 1)  # [blocks + 1, layers, ...]
        changed = diff.flatten(1).any(1).nonzero().flatten().tolist()
        assert set(changed) <= {llm.runner.dummy_block}, f"timing the step wrote outside the scratch page: {changed}"
        outs, rows = engine_logits(llm, prompts, GREEDY)
    finally:
        llm.shutdown()
    check_against_hf(hf, prompts, outs, rows)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_a_later_start_serves_with_the_choices_the_first_kept(model_dir, monkeypatch, tmp_path, caplog, quantization):
    """A second start of the same model reads the first start's timed choices (engine/tune_cache.py) instead of
    timing: the same weight layouts, one-row and few-row plans and FP8 tiles, and decode that agrees with the first
    start's (and with HF in bf16)."""
    from engine.tune_cache import tuned_state

    folder, hf = model_dir
    monkeypatch.setenv("NANOVLLM_TUNE_CACHE", str(tmp_path))
    prompts = make_prompts([40, 9], seed=8)
    states, results = [], []
    for start in range(2):
        caplog.clear()
        with caplog.at_level("INFO", logger="engine"):
            llm = LLM(folder, quantization=quantization, num_kvcache_blocks=256, max_model_len=1024, max_num_seqs=16)
        try:
            read, timed = "choices of an earlier start" in caplog.text, "timed in" in caplog.text
            assert (read, timed) == (start == 1, start == 0), caplog.text[-2000:]
            states.append(tuned_state(llm.runner.model))
            results.append(engine_logits(llm, prompts, GREEDY))
        finally:
            llm.shutdown()
    assert len(list(tmp_path.iterdir())) == 1
    first, second = states
    assert first == second
    if quantization is None:
        assert set(first["gemv_plan"]) == {"qkv", "o", "gate_up", "down"} and set(first["rows_plan"]) == {2, 4, 16, 32}
    else:
        # Each FP8 projection keeps tiles for bf16 activations, FP8 ones, or both (rows_plan: tune_fp8_rows).
        assert first["fp8"] and all(configs or act for configs, act in first["fp8"].values())
    (o1, r1), (o2, r2) = results
    assert compare_while_equal(prompts, o1, r1, o2, r2, TOL) >= GREEDY.max_tokens // 2
    if quantization is None:
        check_against_hf(hf, prompts, o2, r2)


def test_few_row_triton_kernels_match_hf(model_dir, monkeypatch):
    """Steps of 2..32 token rows through the few-row Triton kernels (forced for every role): 5-request decode graphs,
    then after prefix hits a 9-token step (16-row graph) and a 3 x 8-token step (32-row graph), and 2- and
    3-request decode graphs through the GEMV's multi-row form; against HF and against the cuBLAS + FlashInfer
    path."""
    folder, hf = model_dir
    prompts = make_prompts([6, 5, 7, 4, 6], seed=5, prefix=32)
    prefix = prompts[0][:32]
    follow = [prefix + p for p in make_prompts([9, 8, 8, 8], seed=6)]
    batches = [prompts, follow[:1], follow[1:], make_prompts([7, 12], seed=7), make_prompts([5, 9, 3], seed=8)]
    results = []
    for gemv in ("force", "0"):
        monkeypatch.setenv("NANOVLLM_GEMV", gemv)
        llm = LLM(folder, num_kvcache_blocks=256, max_model_len=1024, max_num_seqs=16, block_size=16)
        try:
            plans = llm.runner.model.layers[0].rows_plan
            forced = set(plans) == {2, 4, 16, 32} and all(all(p.values()) for p in plans.values())
            # the 2- and 4-row tiles take the multi-row GEMV (four fields), the others the few-row kernel (five)
            forced = forced and {len(c) for t in (2, 4) for c in plans[t].values()} == {4}
            assert forced if gemv == "force" else not plans
            replays = dict(llm.runner.graphs.replays)
            runs = [engine_logits(llm, batch, GREEDY) for batch in batches]
            assert all(o.num_cached_tokens == 32 for o in runs[1][0] + runs[2][0])  # short steps after hits
            assert llm.runner.graphs.replays["prefill"] >= replays["prefill"] + 2
            assert llm.runner.graphs.replays["decode"] > replays["decode"]
            results.append(runs)
        finally:
            llm.shutdown()
    for runs in results:
        for batch, (outs, rows) in zip(batches, runs, strict=True):
            check_against_hf(hf, batch, outs, rows)
    for batch, (o1, r1), (o2, r2) in zip(batches, *results, strict=True):
        assert compare_while_equal(batch, o1, r1, o2, r2, TOL) >= len(batch)


def fp8_reference(hf, llm):
    """HF in fp32 on the weights the engine's FP8 projections stand for; everything else as hf has it."""
    import copy

    ref = copy.deepcopy(hf).float()
    load_fp8_weights_into_hf(ref, llm)
    return ref


def test_fp8_weights_match_hf_on_their_dequantized_weights(model_dir, monkeypatch):
    """quantization="fp8" with bf16 activations: batch-1 decode (one-row GEMVs), 5-request decode and short prefill
    after a prefix hit (few-row kernels), long prompts and a 40-request decode batch (FP8 tiles of 64 rows, widened
    weights + cuBLAS) all match HF on the weights the FP8 ones stand for, and are closer to it than to HF on the
    unquantized weights."""
    from engine.layers import fp8

    monkeypatch.setattr(fp8, "ACT_MIN_ROWS", 0)
    folder, hf = model_dir
    llm = LLM(folder, quantization="fp8", num_kvcache_blocks=2048, max_model_len=1024, max_num_seqs=48, block_size=16)
    try:
        layer = llm.runner.model.layers[0]
        assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
        assert layer.mlp.down_proj.weight_scale.shape == (layer.mlp.down_proj.weight.shape[0],)
        ref = fp8_reference(hf, llm)
        short = make_prompts([6, 5, 7, 4, 6], seed=5, prefix=32)
        batches = [
            make_prompts([40], seed=4),
            short,
            [short[0][:32] + p for p in make_prompts([9, 8, 8], seed=6)],
            make_prompts([100, 300, 37], seed=3),
            make_prompts([8 + i % 13 for i in range(40)], seed=2),
        ]
        replays = dict(llm.runner.graphs.replays)
        worst_fp8, worst_plain = 0.0, 0.0
        for batch in batches:
            outs, rows = engine_logits(llm, batch, GREEDY)
            worst_fp8 = max(worst_fp8, check_against_hf(hf, batch, outs, rows, ref_model=ref))
            print(f"FP8 weights, {len(batch)} prompts: relative error {worst_fp8:.3e}")
            try:
                worst_plain = max(worst_plain, check_against_hf(hf, batch, outs, rows))
            except AssertionError:
                worst_plain = float("inf")
        assert llm.runner.graphs.replays["decode"] > replays["decode"]
        assert llm.runner.graphs.replays["prefill"] > replays["prefill"]
    finally:
        llm.shutdown()
    assert worst_fp8 < worst_plain, f"FP8 run is not closer to its own weights ({worst_fp8:.3e} vs {worst_plain:.3e})"


@pytest.mark.parametrize("fused", [1, 0])
def test_fp8_activations_stay_near_hf_on_the_fp8_weights(model_dir, fused, monkeypatch):
    """quantization="fp8" with FP8 activations in every step of 2+ token rows (ACT_MIN_ROWS=2, few-row kernels off),
    quantized inside the norm and SwiGLU kernels (fused=1) or in kernels of their own (fused=0): prefill, 5-request
    decode after a prefix hit, long prompts and a 40-request batch stay within what quantizing each projection's
    input per token costs, against HF on the weights the FP8 ones stand for.

    HF with its inputs quantized the same way is no closer a reference: the engine's bf16 activations differ from
    HF's fp32 ones by rounding, which moves values across e4m3 rounding boundaries about as often as quantizing
    moves them at all. The exact product is tests/gpu/test_gemv.py's; this checks the wiring (which steps take
    FP8 activations, rows and scales in place: a wrong one is an error of order 1)."""
    from engine.layers import fp8

    monkeypatch.setattr(fp8, "ACT_MIN_ROWS", 2)
    monkeypatch.setattr(fp8, "FUSED_QUANTIZE", bool(fused))
    monkeypatch.setenv("NANOVLLM_GEMV_MAX_ROWS", "1")
    rows_seen, fused_rows = [], []
    scaled_mm, fused_norm = fp8.fp8_scaled_mm, fp8.add_rmsnorm_quantize
    monkeypatch.setattr(fp8, "fp8_scaled_mm", lambda x8, *a: rows_seen.append(x8.shape[0]) or scaled_mm(x8, *a))
    monkeypatch.setattr(fp8, "add_rmsnorm_quantize", lambda x, *a: fused_rows.append(x.shape[0]) or fused_norm(x, *a))
    folder, hf = model_dir
    llm = LLM(folder, quantization="fp8", num_kvcache_blocks=2048, max_model_len=1024, max_num_seqs=48, block_size=16)
    try:
        assert llm.runner.model.layers[0].rows_max == 1
        ref = fp8_reference(hf, llm)
        short = make_prompts([6, 5, 7, 4, 6], seed=5, prefix=32)
        batches = [
            short,
            [short[0][:32] + p for p in make_prompts([9, 8, 8], seed=6)],
            make_prompts([100, 300, 37], seed=3),
            make_prompts([8 + i % 13 for i in range(40)], seed=2),
        ]
        for batch in batches:
            outs, rows = engine_logits(llm, batch, GREEDY)
            worst = check_against_hf(hf, batch, outs, rows, ref_model=ref, tol=FP8_ACT_TOL)
            print(f"FP8 activations (fused={fused}), {len(batch)} prompts: worst relative error {worst:.3e}")
    finally:
        llm.shutdown()
    # Graphs call it when captured, eager steps each time; the 1-row graphs and steps never do. The norms before
    # qkv and gate/up quantize in their own kernel (fp8.FUSED_QUANTIZE, on by default).
    assert rows_seen and min(rows_seen) >= 2, sorted(set(rows_seen))
    assert (fused_rows and min(fused_rows) >= 2) if fused else not fused_rows, sorted(set(fused_rows))


def test_biased_projections_through_every_kernel_match_hf(tmp_path, monkeypatch):
    """A Llama-shaped model with attention_bias (q, k, v and o_proj) and mlp_bias (gate, up and down): batch-1 decode
    through the one-row GEMVs and 5-request steps through the few-row kernels (both forced, every bias fused,
    the packed gate/up bias's halves on their own rows), and the cuBLAS + FlashInfer path, against HF."""
    from transformers import AutoModelForCausalLM

    cfg = llama_1b_shape()
    cfg.attention_bias, cfg.mlp_bias = True, True
    torch.manual_seed(1)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:  # HF starts biases at 0: give every one a value to get wrong
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    hf.eval()
    batches = [make_prompts([40], seed=8), make_prompts([6, 5, 7, 4, 6], seed=9)]
    for gemv in ("force", "0"):
        monkeypatch.setenv("NANOVLLM_GEMV", gemv)
        llm = LLM(tmp_path, num_kvcache_blocks=256, max_model_len=1024, max_num_seqs=16)
        try:
            layer = llm.runner.model.layers[0]
            assert layer.self_attn.o_proj.bias is not None and layer.mlp.gate_up_proj.bias is not None
            assert all(layer.gemv_plan.values()) if gemv == "force" else not layer.gemv_plan
            runs = [engine_logits(llm, batch, GREEDY) for batch in batches]
        finally:
            llm.shutdown()
        for batch, (outs, rows) in zip(batches, runs, strict=True):
            check_against_hf(hf, batch, outs, rows)
