"""The one-token decode path (DecoderLayer.forward_row) and the Triton kernels' host-side choices, on the CPU.

The kernels themselves run only on CUDA (tests/gpu/test_gemv.py, tests/gpu/test_triton_decode.py); here: the
row path composes the same computation as the batched path, and the switches and tile choices are sound."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.attention.triton_decode import (
    MAX_SPLITS,
    SplitDecode,
    attn_preload_pages,
    fused_decode_enabled,
    triton_decode_max_rows,
)
from engine.cuda_graphs import (
    LARGE_PREFILL_TOKEN_SIZES,
    PREFILL_TOKEN_SIZES,
    SRC_ROW,
    graph_warmup_mode,
    large_prefill_sizes,
    step_tune_enabled,
)
from engine.layers.gemv import (
    MAX_TILES,
    ROLES,
    ROWS_CONFIGS,
    SMALL_K_CONFIGS,
    configs_for,
    gemv_max_rows,
    gemv_mode,
    plan_tile,
    rows_configs_for,
    rows_tile,
)
from engine.models.llama import DecoderLayer


def test_row_path_matches_the_batched_path(qwen3_path, monkeypatch):
    """With every role left unfused, forward_row (norm, attend, projections, residual) gives the same tokens."""
    llm = LLM(qwen3_path, device="cpu", enable_prefix_caching=False)
    try:
        layers = llm.runner.model.layers
        assert all(layer.gemv_plan == {} for layer in layers)  # no Triton tuning on the CPU
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        prompts = [[3, 17, 98, 5, 44, 200, 7]]
        batched = llm.generate(prompts, params)[0].token_ids
        calls = []
        original = DecoderLayer.forward_row
        monkeypatch.setattr(DecoderLayer, "forward_row", lambda *a: calls.append(1) or original(*a))
        for layer in layers:
            layer.gemv_plan = dict.fromkeys(ROLES)  # non-empty: one-token steps take forward_row
        row = llm.generate(prompts, params)[0].token_ids
    finally:
        llm.shutdown()
    assert len(calls) >= len(layers) * (params.max_tokens - 1)  # every decode step, every layer
    assert row == batched


def test_few_row_steps_take_the_row_path(qwen3_path, monkeypatch):
    """Steps of 2..32 token rows go through forward_row with the plan of their row tile, larger ones do not, and
    the tokens are those of the batched path."""
    llm = LLM(qwen3_path, device="cpu", enable_prefix_caching=False)
    try:
        layers = llm.runner.model.layers
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        prompts = [[3, 17, 98, 5, 44, 200, 7], [9, 8, 7], [5] * 40]
        batched = [o.token_ids for o in llm.generate(prompts, params)]
        seen = []
        original = DecoderLayer.forward_row

        def spy(self, x, residual, ctx, plan=None):
            seen.append((x.shape[0], plan))
            return original(self, x, residual, ctx, plan)

        monkeypatch.setattr(DecoderLayer, "forward_row", spy)
        plans = {tile: dict.fromkeys(ROLES) for tile in (2, 4, 16, 32)}
        for layer in layers:
            layer.rows_plan = plans
        rows = [o.token_ids for o in llm.generate(prompts, params)]
        seen_default = list(seen)
        seen.clear()
        for layer in layers:
            layer.rows_max = 2  # NANOVLLM_GEMV_MAX_ROWS=2: 3-request steps stay batched
        capped = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.shutdown()
    assert rows == batched == capped
    assert {n for n, _ in seen_default} == {3}  # the 50-token prefill ran batched, the 3-request decode row-wise
    assert all(plan is plans[4] for _, plan in seen_default)  # 3 rows: the multi-row GEMV's tile
    assert not seen
    assert [plan_tile(m) for m in (2, 3, 4, 5, 16, 17, 32)] == [2, 4, 4, 16, 16, 32, 32]
    assert rows_tile(2) == rows_tile(16) == 16 and rows_tile(17) == rows_tile(32) == 32
    assert rows_tile(33) == rows_tile(64) == 64 and rows_tile(200) == 256  # the profile's wide tiles


@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 3072), (12288, 4096), (1536, 576), (96, 576), (3, 128)])
def test_gemv_configs_divide_the_weight(n, k):
    for block_n, block_k, _, _ in configs_for(n, k):
        assert n % block_n == 0 and k % block_k == 0
    if k == 576:  # no main configuration divides SmolLM2's hidden size: the small-K ones serve it
        assert set(configs_for(n, k)) <= set(SMALL_K_CONFIGS)


def test_split_count_fills_the_gpu_with_a_power_of_two():
    for rows in (1, 2, 4, 8):
        for kv_heads in (1, 3, 8):
            want = 2 * 132 // (rows * kv_heads)
            splits = SplitDecode(rows, kv_heads * 4, kv_heads, 64, "cpu", num_sms=132).splits
            assert splits & (splits - 1) == 0 and 1 <= splits <= MAX_SPLITS
            assert splits == MAX_SPLITS or splits <= want < 2 * splits or (want == 0 and splits == 1)


def test_split_kernels_of_several_sizes_share_one_set_of_partial_buffers():
    """The skewed-batch twins (engine/cuda_graphs.py) give every size views of one buffer set sized for the largest;
    a set too small or a split count the merge cannot tile is refused."""
    from engine.attention.triton_decode import split_buffers

    hq, hkv, d, splits = 16, 8, 64, 16
    buffers = split_buffers(128 * hq * splits, 128 * hkv, d, "cpu")
    small = SplitDecode(48, hq, hkv, d, "cpu", num_sms=132, splits=splits, buffers=buffers)
    large = SplitDecode(128, hq, hkv, d, "cpu", num_sms=132, splits=splits, buffers=buffers)
    assert small.splits == large.splits == splits  # not the default of about two programs per SM (1 here)
    assert small.part_o.shape == (48 * hq * splits, d) and large.part_o.shape == (128 * hq * splits, d)
    assert small.part_o.data_ptr() == large.part_o.data_ptr() == buffers[0].data_ptr()
    assert small.counter.numel() == 48 * hkv and not large.counter.any()  # arrival counters start at zero
    with pytest.raises(ValueError, match="hold 8192 partial states, 9216 needed"):
        SplitDecode(144, hq, hkv, d, "cpu", num_sms=132, splits=4, buffers=split_buffers(8192, 1152, d, "cpu"))
    for bad in (12, 64):
        with pytest.raises(ValueError, match=f"splits={bad} must be a power of two from 1 to {MAX_SPLITS}"):
            SplitDecode(48, hq, hkv, d, "cpu", num_sms=132, splits=bad)


def test_deferred_split_decode_notes_one_compile_per_configuration_and_launches_nothing():
    """Graph start-up compiles the split-KV kernel's configurations side by side (GraphRunner.precompile_split_decode):
    inside deferred_compiles() a launch only notes its configuration's compile, once per configuration."""
    pytest.importorskip("triton")
    from engine.attention.triton_decode import deferred_compiles

    hq, hkv, d, bs = 4, 2, 16, 16
    cache = torch.zeros(3, 2, hkv, bs, d)
    indptr, indices, last = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 1]), torch.tensor([5])
    q = torch.randn(1, hq, d)
    small, other = SplitDecode(1, hq, hkv, d, "cpu", num_sms=132), SplitDecode(1, hq, hkv, d, "cpu", num_sms=4)
    with deferred_compiles() as calls:
        for _ in range(3):  # a forward's layers: one configuration
            small(q, cache, indptr, indices, last)
        assert len(calls) == 1
        small.with_lse(q, cache, indptr, indices, last)  # cascade's states: another
        other(q, cache, indptr, indices, last)  # fewer splits: another
    assert len(calls) == 3 and small.compiled is None  # nothing launched (on the CPU a launch raises)
    noted = [call.keywords for call in calls.values()]
    want = [(small.splits, False), (small.splits, True), (other.splits, False)]
    assert [(c["S"], c["LSE"]) for c in noted] == want and not any(c["FUSED"] for c in noted)
    assert all(call.func.__name__ == "warmup" for call in calls.values())
    assert [c["grid"] for c in noted] == [(1, hkv, s) for s, _ in want]
    with pytest.raises(Exception):  # noqa: B017, PT011 - outside it the same call launches, which the CPU cannot
        small(q, cache, indptr, indices, last)


def test_switches_reject_bad_values(monkeypatch):
    monkeypatch.setenv("NANOVLLM_GEMV", "yes")
    with pytest.raises(ValueError, match="NANOVLLM_GEMV='yes'"):
        gemv_mode()
    monkeypatch.setenv("NANOVLLM_TRITON_DECODE_MAX_ROWS", "eight")
    with pytest.raises(ValueError, match="NANOVLLM_TRITON_DECODE_MAX_ROWS='eight'"):
        triton_decode_max_rows()
    monkeypatch.setenv("NANOVLLM_TRITON_DECODE_MAX_ROWS", "4")
    assert triton_decode_max_rows() == 4
    for bad in ("0", "33", "many"):
        monkeypatch.setenv("NANOVLLM_GEMV_MAX_ROWS", bad)
        with pytest.raises(ValueError, match=f"NANOVLLM_GEMV_MAX_ROWS='{bad}'.*from 1 to 32"):
            gemv_max_rows()
    monkeypatch.setenv("NANOVLLM_GEMV_MAX_ROWS", "16")
    assert gemv_max_rows() == 16
    for name, read in (("NANOVLLM_FUSED_DECODE", fused_decode_enabled), ("NANOVLLM_STEP_TUNE", step_tune_enabled)):
        monkeypatch.setenv(name, "on")
        with pytest.raises(ValueError, match=f"{name}='on' must be 0 or 1"):
            read()
        monkeypatch.setenv(name, "0")
        assert read() is False
        monkeypatch.delenv(name)
        assert read() is True  # the default
    monkeypatch.setenv("NANOVLLM_GRAPH_WARMUP", "all")
    with pytest.raises(ValueError, match="NANOVLLM_GRAPH_WARMUP='all' must be 'first' or 'each'"):
        graph_warmup_mode()
    monkeypatch.setenv("NANOVLLM_GRAPH_WARMUP", "each")
    assert graph_warmup_mode() == "each"
    monkeypatch.delenv("NANOVLLM_GRAPH_WARMUP")
    assert graph_warmup_mode() == "first"  # the default
    for bad in ("0", "two"):
        monkeypatch.setenv("NANOVLLM_ATTN_MIN_PAGES", bad)
        with pytest.raises(ValueError, match=f"NANOVLLM_ATTN_MIN_PAGES='{bad}'.*at least 1"):
            SplitDecode(1, 16, 8, 128, "cpu", num_sms=132)
    monkeypatch.setenv("NANOVLLM_ATTN_MIN_PAGES", "8")
    assert SplitDecode(1, 16, 8, 128, "cpu", num_sms=132).min_pages == 8
    monkeypatch.setenv("NANOVLLM_ATTN_PRELOAD", "on")
    with pytest.raises(ValueError, match="NANOVLLM_ATTN_PRELOAD='on' is not one of 'auto', '0', '1', '2', '4'"):
        attn_preload_pages()
    monkeypatch.setenv("NANOVLLM_ATTN_PRELOAD", "4")
    assert attn_preload_pages(1) == attn_preload_pages(8) == 4
    monkeypatch.delenv("NANOVLLM_ATTN_PRELOAD")
    # The default: two pages for the 8-request graph (5-8 requests), one below it.
    assert [attn_preload_pages(rows) for rows in (1, 2, 4, 8)] == [1, 1, 1, 2]


def test_a_graph_reads_the_tokens_of_the_step_in_flight_from_the_samplers_buffer():
    """Where the step in flight sampled into the sampler's token buffer, a replay names each pending row's source
    row there (SRC_ROW, read by the graph's embedding kernel) and patches nothing; tokens elsewhere (the torch
    sampler's) are patched into the input ids before the replay, and no row reads the buffer."""
    from types import SimpleNamespace

    from engine.cuda_graphs import GraphRunner

    graphs = GraphRunner.__new__(GraphRunner)
    calls = []
    graphs.graphs = {("decode", 4): (SimpleNamespace(replay=lambda: calls.append("replay")), torch.zeros(4, 5))}
    host = torch.zeros(7, 8, dtype=torch.long)
    host[SRC_ROW] = 5  # an earlier step's source rows
    graphs.static, graphs.host, graphs.host_np = torch.zeros(7, 8, dtype=torch.long), host, host.numpy()
    graphs.large_inputs, graphs.replays = None, {"decode": 0}
    graphs.runner = SimpleNamespace(patch_inputs=lambda *a: calls.append("patch"), inputs_sent=lambda: None)
    graphs.sampled = buffer = torch.zeros(16, dtype=torch.long)
    # Rows 0 and 2 of this step take the tokens the step in flight sampled in its rows 1 and 0.
    graphs._replay(("decode", 4), 3, ([0, 2], [1, 0]), (buffer[:3], {}))
    assert calls == ["replay"]
    assert graphs.static[SRC_ROW, :4].tolist() == [1, -1, 0, -1]
    calls.clear()
    graphs._replay(("decode", 4), 3, ([0, 2], [1, 0]), (torch.zeros(3, dtype=torch.long), {}))
    assert calls == ["patch", "replay"]
    assert graphs.static[SRC_ROW, :4].tolist() == [-1] * 4


def test_large_prefill_graph_sizes_follow_the_switch_and_the_step_budget(monkeypatch):
    monkeypatch.delenv("NANOVLLM_LARGE_PREFILL_GRAPHS", raising=False)
    assert large_prefill_sizes(8192) == list(LARGE_PREFILL_TOKEN_SIZES)  # "auto": all captured, then measured
    assert large_prefill_sizes(2048) == [768, 1024, 1536, 2048]  # never above the step's token budget
    assert large_prefill_sizes(512) == []
    # Consecutive sizes at most 1.5x apart, from the small graphs' largest on: a step pads by at most half.
    sizes = [PREFILL_TOKEN_SIZES[-1], *LARGE_PREFILL_TOKEN_SIZES]
    assert all(b <= 1.5 * a for a, b in zip(sizes, sizes[1:]))
    monkeypatch.setenv("NANOVLLM_LARGE_PREFILL_GRAPHS", "1")
    assert large_prefill_sizes(4096) == list(LARGE_PREFILL_TOKEN_SIZES)
    monkeypatch.setenv("NANOVLLM_LARGE_PREFILL_GRAPHS", "0")
    assert large_prefill_sizes(8192) == []
    monkeypatch.setenv("NANOVLLM_LARGE_PREFILL_GRAPHS", "yes")
    with pytest.raises(ValueError, match="NANOVLLM_LARGE_PREFILL_GRAPHS='yes' must be 'auto', '0' or '1'"):
        large_prefill_sizes(8192)


def test_a_large_prefill_graph_serves_only_while_it_replays_no_slower_than_the_eager_step():
    from collections import deque
    from types import SimpleNamespace

    import torch

    from engine.cuda_graphs import RULE_WINDOW, GraphRunner

    class Event:  # a CUDA event pair's stand-in: `span` ms apart, reached by the device once `done`
        def __init__(self, span: float = 0.0):
            self.span, self.done, self.recorded = span, False, 0

        def record(self) -> None:
            self.recorded += 1

        def query(self) -> bool:
            return self.done

        def elapsed_time(self, end) -> float:
            return self.span

    graphs = GraphRunner.__new__(GraphRunner)  # only the fields the rule reads
    graphs.prefill_rows, graphs.prefill_sizes = 17, [16, 512, 768, 4096]
    graphs.large_replay_ms, graphs.eager_launch_ms = {768: 2.5, 4096: 11.6}, 7.0
    graphs.eager_excess, graphs.device_pace, graphs._eager_timed, graphs._graph_timed = 1.0, 1.0, None, None
    # The rule reads the median of the latest three timings of each kind; the start-up launch counts as one.
    assert RULE_WINDOW == 3
    graphs._launches, graphs._paces, graphs._excesses = deque([7.0], maxlen=3), deque(maxlen=3), deque(maxlen=3)

    def size(tokens: int, reqs: int = 1):
        return graphs.prefill_size(tokens, reqs)

    # Kernel time between the captured sizes is interpolated from their replays (zero tokens: zero time).
    assert graphs.kernel_ms(4096) == 11.6 and graphs.kernel_ms(384) == 1.25
    assert abs(graphs.kernel_ms(2432) - (2.5 + 11.6) / 2) < 1e-9
    assert size(10) == 16 and size(512) == 512 and size(700) == 768
    # 3,000 tokens: the graph replays 4,096 in 11.6 ms; eagerly, launch 7 ms, kernels ~8.6: eager, unpadded.
    assert size(3000) is None
    assert size(4096) == 4096  # no padding: the eager step's kernels alone take as long as the replay
    assert size(5000) is None and size(100, reqs=17) is None  # larger than every graph; more requests than rows
    graphs.note_eager_launch(15.0)  # one slow launch: the median of 7 and 15 is 11 ms, still under the replay
    assert graphs.eager_launch_ms == 11.0 and size(3000) is None
    graphs.note_eager_launch(15.0)  # the host got slower: the 4,096-token graph pays now
    assert graphs.eager_launch_ms == 15.0 and size(3000) == 4096
    graphs.note_eager_launch(2.0)  # one fast launch among 15s changes nothing
    assert graphs.eager_launch_ms == 15.0 and size(3000) == 4096
    graphs.note_eager_launch(2.0)
    assert graphs.eager_launch_ms == 2.0 and size(3000) is None and size(700) is None and size(300) == 512
    # A timed eager step of 4,000 tokens: launched in 10 ms (the median stays 2), its kernels ~11.3 ms, yet it
    # kept the device 13 ms (the host's hiccups idle the device). Until the device is past it nothing changes;
    # then the excess counts.
    assert graphs.times_eager(4000, 1) and not graphs.times_eager(5000, 1) and not graphs.times_eager(4000, 17)
    start, end = Event(13.0), Event()
    graphs.note_eager_launch(10.0, (start, end, 4000))
    assert end.recorded == 1 and graphs.eager_launch_ms == 2.0 and size(4000) is None and graphs.eager_excess == 1.0
    end.done = True
    assert size(4000) == 4096 and abs(graphs.eager_excess - 13.0 / graphs.kernel_ms(4000)) < 1e-9
    # The excess scales the estimate: 2,400 tokens eagerly max(launch 2, kernels ~7.0) x 1.15 = 8.1 ms, against
    # 4,096's 11.6 ms replay: eager; 3,900 tokens: ~11.1 x 1.15 = 12.7 ms, the graph.
    assert size(2400) is None and size(3900) == 4096
    assert graphs._eager_timed is None  # read once
    for _ in range(2):  # steps shorter than either bound (they overlapped another step): an excess of 1
        graphs.note_eager_launch(1.0, (Event(0.5), Event(), 3000))
        graphs._eager_timed[1].done = True
        graphs.prefill_size(4000, 1)
        assert graphs._excesses[-1] == 1.0
    assert list(graphs._excesses) == [13.0 / graphs.kernel_ms(4000), 1.0, 1.0]
    assert graphs.eager_excess == 1.0 and size(3900) is None
    graphs.large_replay_ms = {}  # NANOVLLM_LARGE_PREFILL_GRAPHS=1: nothing timed, every graph serves
    assert size(3000) == 4096 and not graphs.times_eager(3000, 1)
    # The device's pace: a Qwen3-8B-like engine whose 4,096-token graph replayed in 92.4 ms at start-up, and
    # 3,072 in 67.9. A 3,072-token graph step then took 74.2 ms (clocks drop under load: pace 1.093), and an eager
    # 3,000-token step 79.5 ms, launched in 28. At that pace its kernels take ~72.5 ms: an excess of 1.097. A
    # 3,500-token step then stays eager, ~85.4 x 1.097 = 93.7 ms against the 4,096 graph's ~101: without the
    # pace the excess would read 79.5 / 66.3 = 1.199 and the estimate 93.7 against a replay of 92.4, the graph.
    graphs.prefill_sizes, graphs.large_replay_ms = [16, 512, 3072, 4096], {3072: 67.9, 4096: 92.4}
    graphs.eager_excess = 1.0
    graphs._excesses.clear()
    graphs._graph_timed = (Event(74.2), Event(), 3072)
    graphs._graph_timed[1].done = True
    graphs.note_eager_launch(28.0, (Event(79.5), Event(), 3000))
    graphs._eager_timed[1].done = True
    assert size(3500) is None
    assert abs(graphs.device_pace - 74.2 / 67.9) < 1e-9 and graphs._graph_timed is None
    assert abs(graphs.eager_excess - 79.5 / (graphs.device_pace * graphs.kernel_ms(3000))) < 1e-9
    graphs.device_pace = 1.0
    graphs.eager_excess = 79.5 / graphs.kernel_ms(3000)
    assert size(3500) == 4096  # what the rule without the pace chose, against 88-90 ms eagerly (section 8)
    assert graphs.graph_timing(512) is None  # small graphs are not timed
    # A timed replay records its start right before the graph and its end right after; the next choice reads them.
    calls = []
    start, end = Event(), Event()
    start.record = lambda: calls.append("start")
    end.record = lambda: calls.append("end")
    graphs.graphs = {("prefill", 4096): (SimpleNamespace(replay=lambda: calls.append("replay")), torch.zeros(3, 5))}
    graphs.static, graphs.host = torch.zeros(6, 8, dtype=torch.long), torch.ones(6, 8, dtype=torch.long)
    graphs.host_np, graphs.large_inputs = None, (graphs.static, graphs.host, None)
    graphs.replays = {"prefill": 0}
    graphs.runner = SimpleNamespace(patch_inputs=lambda *a: calls.append("patch"), inputs_sent=lambda: None)
    graphs.sampled = None  # no sampler buffer (the torch sampler): input tokens are patched before each replay
    logits = graphs._replay(("prefill", 4096), 2, None, None, (start, end, 4096))
    assert calls == ["patch", "start", "replay", "end"] and logits.shape == (2, 5)
    assert graphs._graph_timed == (start, end, 4096) and graphs.replays["prefill"] == 1
    assert bool((graphs.static == 1).all())  # the input block went to the device copy first
    # Large prefill graphs read an input block of their own; every other graph the small one (a few KiB per copy).
    graphs.static, graphs.host, graphs.host_np, graphs.large_inputs = "static", "host", "np", ("big",) * 3
    blocks = {key: graphs._inputs(*key)[0] for key in [("prefill", 512), ("prefill", 768), ("decode", 64)]}
    assert blocks == {("prefill", 512): "static", ("prefill", 768): "big", ("decode", 64): "static"}


@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (1024, 3072), (12288, 4096), (1536, 576)])
def test_few_row_configs_divide_the_weight(n, k):
    configs = rows_configs_for(n, k)
    for block_n, block_k, _, _, splits in configs:
        assert n % block_n == 0 and k % (block_k * splits) == 0 and n // block_n <= MAX_TILES
    if k == 576:  # SmolLM2: no K step divides it, so the unfused path serves it
        assert not configs
    else:  # several K splits for every Qwen3 projection: hundreds of programs stream one weight
        assert len({c[4] for c in configs}) >= 2
    assert set(configs) <= set(ROWS_CONFIGS)


def test_the_one_row_kernel_preloads_as_many_k_steps_as_fit(monkeypatch):
    """NANOVLLM_GEMV_PRELOAD=all (the default) preloads a small weight's slice's K steps while they fit
    PRELOAD_BYTES_PER_THREAD, counting the step axis padded to a power of two and the "up" half of gate/up, and a
    large weight's first step; "1" the first step, "0" none."""
    from engine.layers.gemv import PRELOAD_BYTES_PER_THREAD, preload_steps

    monkeypatch.delenv("NANOVLLM_GEMV_PRELOAD", raising=False)
    assert PRELOAD_BYTES_PER_THREAD == 256
    # Qwen3-0.6B's down projection (K 3,072): whole, 3 steps padded to 4 (128 bytes a thread) or 6 to 8 (256).
    assert preload_steps(2, 1024, 4, 3072, 2, False, True) == 3
    assert preload_steps(2, 512, 2, 3072, 2, False, True) == 6
    # 8 steps of 64 bytes a thread would be 512: the most that fit is 4 (256).
    assert preload_steps(8, 512, 4, 4096, 2, False, True) == 4
    # The "up" half doubles the bytes: 4 steps of 128 bytes fit 2.
    assert preload_steps(8, 512, 4, 4096, 2, True, True) == 2
    assert preload_steps(8, 512, 4, 4096, 1, True, True) == 4  # FP8 weights: a byte an element
    assert preload_steps(4, 1024, 8, 1024, 2, True, True) == 1  # one step is the whole K
    assert preload_steps(2, 512, 2, 3072, 2, False, False) == 1  # a large weight: its first step
    monkeypatch.setenv("NANOVLLM_GEMV_PRELOAD", "1")
    assert preload_steps(2, 512, 2, 3072, 2, False, True) == 1
    monkeypatch.setenv("NANOVLLM_GEMV_PRELOAD", "0")
    assert preload_steps(2, 512, 2, 3072, 2, False, True) == 0


def test_a_few_row_launch_whose_preload_does_not_fit_runs_without_it(monkeypatch):
    """A few-row configuration whose preloaded first K step needs more shared memory than an SM has (Triton raises
    OutOfResources as the kernel loads, before it launches) runs without the preload, and later launches of it go
    straight there; NANOVLLM_GEMV_PRELOAD=0 never tries it."""
    from triton.runtime.errors import OutOfResources

    import engine.layers.gemv as gemv

    calls = []

    def launch(*args, PRELOAD, PREFETCH, **options):
        calls.append(PRELOAD)
        if PRELOAD:
            raise OutOfResources(278528, 232448, "shared memory")

    monkeypatch.setattr(gemv, "_build_rows_kernel", lambda: _Grid(launch))
    monkeypatch.setattr(gemv, "_NO_PRELOAD", set())
    x, w = torch.zeros(3, 256), torch.zeros(128, 256)
    cfg = (64, 128, 4, 2, 1)
    gemv._launch_rows(x, w, cfg)
    gemv._launch_rows(x, w, cfg)
    assert calls == [True, False, False]
    gemv._launch_rows(x, w, (64, 256, 4, 2, 1))  # another configuration tries it again
    assert calls[3:] == [True, False]
    monkeypatch.setenv("NANOVLLM_GEMV_PRELOAD", "0")
    monkeypatch.setattr(gemv, "_NO_PRELOAD", set())
    gemv._launch_rows(x, w, cfg)
    assert calls[5:] == [False]
    monkeypatch.setenv("NANOVLLM_GEMV_PRELOAD", "yes")
    with pytest.raises(ValueError, match="NANOVLLM_GEMV_PRELOAD='yes'"):
        gemv._launch_rows(x, w, cfg)


class _Grid:
    """Stands for a Triton kernel: kernel[grid](...) calls `launch`."""

    def __init__(self, launch):
        self.launch = launch

    def __getitem__(self, grid):
        return self.launch


def test_warm_in_threads_runs_the_candidates_side_by_side(monkeypatch):
    """The start-up timings' first launches (where Triton compiles) run concurrently, each once, in inference mode,
    and one that raises leaves the others running."""
    import threading

    import torch

    from engine.layers.linear import warm_in_threads

    monkeypatch.setenv("NANOVLLM_COMPILE_THREADS", "4")
    barrier = threading.Barrier(3, timeout=10)  # passes only if three calls run at the same time
    seen = []

    def call(i: int):
        def run():
            seen.append((i, torch.is_inference_mode_enabled()))
            if i == 1:
                raise RuntimeError("a configuration too large for this GPU")
            if i > 1:
                barrier.wait()

        return run

    warm_in_threads([call(i) for i in range(5)], torch.device("cpu"))
    assert sorted(seen) == [(0, True), (1, True), (2, True), (3, True), (4, True)]
    assert not barrier.broken

    monkeypatch.setenv("NANOVLLM_COMPILE_THREADS", "1")  # one at a time: nothing runs ahead of the timing
    seen.clear()
    warm_in_threads([call(i) for i in range(3)], torch.device("cpu"))
    assert seen == []
