"""Probe: the projections of all 28 Qwen3-0.6B layers (random weights) in one persistent Gluon kernel whose weight
slices stream into shared memory through TMA, with grid barriers between the five phases of a layer and attention
left out (a barrier only). Timer points inside the kernel give each phase's span.

Why: the Triton megakernel of the fifteenth session (benchmarks/results/ab/s15_megakernel.patch) lost because its
plain loads of weight slices delay the barrier polls queued behind them and reach only ~25 GB/s per SM
(docs/benchmarks.md, section 1). Here the copy engine streams each program's slices one phase or more ahead (11
TMA copies per layer: 3D boxes [rows, 256-column chunks, 256]), so this measures what is left: the barriers and
each phase's own latency. The norms and the residual are left out too, so its output is no model's. Three variants,
timed in one run: the copies issued between a barrier's arrival and its wait, the next QKV slice copied a phase
later, and the copies issued by a producer warp (`gemv_layers_ws`).

Usage (GPU host, Triton >= 3.6 with Gluon, sm90): python benchmarks/gluon_mega_probe.py [--layers 28]
(--layers 1 also checks layer 0's QKV projection against torch).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma  # noqa: E402

# Qwen3-0.6B: hidden, QKV rows, q width, intermediate; 128 programs (one per SM of an H100, at most).
H, NQKV, QD, INTER = gl.constexpr(1024), gl.constexpr(4096), gl.constexpr(2048), gl.constexpr(3072)
P = gl.constexpr(128)
# A program's rows of QKV, o/down and gate (and up); the bytes of its QKV and o boxes and of one [8, 4, 256] box.
QKV_ROWS, O_ROWS, GU_ROWS = gl.constexpr(32), gl.constexpr(8), gl.constexpr(24)
QKV_BYTES, O_BYTES, BOX16 = gl.constexpr(32 * 4 * 256 * 2), gl.constexpr(8 * 8 * 256 * 2), gl.constexpr(8 * 4 * 256 * 2)
TIMER_ASM = gl.constexpr("mov.u64 $0, %globaltimer;")
STAMPS = gl.constexpr(12)


@gluon.jit
def _stamp(time_ptr, k: gl.constexpr, pid):
    now = gl.inline_asm_elementwise(TIMER_ASM, "=l,r", [pid], dtype=gl.int64, is_pure=False, pack=1)
    gl.store(time_ptr + k, now)


@gluon.jit
def _arrive(bar_ptr):
    # All threads are done with this phase (their stores issued, their shared-memory reads of a buffer about to
    # be refilled done); one releases the arrival.
    gl.thread_barrier()
    fence_async_shared()
    gl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")


@gluon.jit
def _wait(bar_ptr, target):
    seen = gl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = gl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    gl.thread_barrier()


@gluon.jit
def _vecs(ptr, C0: gl.constexpr, C: gl.constexpr, xl: gl.constexpr):
    # Input chunks [C0, C0 + C) of 256 values as a [C, 256] tensor (another program wrote them: read from L2).
    c = gl.arange(0, C, layout=gl.SliceLayout(1, xl))
    k = gl.arange(0, 256, layout=gl.SliceLayout(0, xl))
    offs = (C0 + gl.expand_dims(c, 1)) * 256 + gl.expand_dims(k, 0)
    return gl.load(ptr + offs, cache_modifier=".cg").to(gl.float32)


@gluon.jit
def _matvec(box, x, L3: gl.constexpr):
    # rows of one TMA box [R, C, 256] times the input chunks x [C, 256]: [R] in fp32.
    w = box.load(L3).to(gl.float32)
    return gl.sum(gl.sum(w * gl.expand_dims(x, 0), axis=2), axis=1)


@gluon.jit
def _store(ptr, row0, y, R: gl.constexpr, rl: gl.constexpr):
    gl.store(ptr + row0 + gl.arange(0, R, layout=rl), y.to(ptr.dtype.element_ty))


@gluon.jit
def _copy_gate_up(gu_desc, g0, bar, gu_s):
    # A program's 24 gate rows and its 24 up rows (INTER rows further) as three [8, 4, 256] boxes each.
    mbarrier.expect(bar, 6 * BOX16)
    for j in gl.static_range(3):
        tma.async_copy_global_to_shared(gu_desc, [g0 + j * 8, 0, 0], bar, gu_s.index(j))
        tma.async_copy_global_to_shared(gu_desc, [g0 + INTER + j * 8, 0, 0], bar, gu_s.index(3 + j))


@gluon.jit
def _phase_done(WS: gl.constexpr, buffer_free, ts, k: gl.constexpr, pid, bar_ptr):
    # A phase's stores are issued: with WS release the buffer it read to the producer, stamp point k, arrive.
    if WS:
        gl.thread_barrier()
        mbarrier.arrive(buffer_free)
    _stamp(ts, k, pid)
    _arrive(bar_ptr)


@gluon.jit
def _layers(qkv_desc, o_desc, gu_desc, dn_desc, q_s, gu_s, dn_s, o_s, full, empty, qkv_ptr, attn_ptr, o_ptr,
            act_ptr, down_ptr, bar_ptr, time_ptr, pid, num_layers, WS: gl.constexpr, AHEAD: gl.constexpr):  # fmt: skip
    # The phases of every layer. Without WS this code also issues the copies (between a barrier's arrival and its
    # wait; AHEAD: the next QKV slice right after this one is read) and down comes as three boxes; with WS a
    # producer warp issues them (this code releases each buffer on `empty`) and down is one zero-padded box.
    L3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 1, 32], [8, 1, 1], [2, 1, 0])
    xl: gl.constexpr = gl.SliceLayout(0, L3)
    rl: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L3))
    row_q = pid * QKV_ROWS
    row_o = pid * O_ROWS
    row_g = pid * GU_ROWS
    for layer in range(num_layers):
        ph = layer & 1
        base = 5 * layer * P
        more = layer + 1 < num_layers
        ts = time_ptr + (pid * num_layers + layer) * STAMPS
        _stamp(ts, 0, pid)
        if layer > 0:
            _wait(bar_ptr, base)  # the arrival happened at the end of the last layer
        _stamp(ts, 1, pid)
        # ---- QKV ----
        x = _vecs(down_ptr, 0, 4, xl)  # (the driver puts the token's embedding there before layer 0)
        _stamp(ts, 2, pid)
        mbarrier.wait(full.index(0), ph)
        _stamp(ts, 3, pid)
        _store(qkv_ptr, row_q, _matvec(q_s, x, L3), 32, rl)
        _phase_done(WS, empty.index(0), ts, 4, pid, bar_ptr)
        if not WS and AHEAD:  # the QKV buffer is free: the next layer's slice streams in for a whole layer
            if more:
                mbarrier.expect(full.index(0), QKV_BYTES)
                tma.async_copy_global_to_shared(qkv_desc, [(layer + 1) * NQKV + row_q, 0, 0], full.index(0), q_s)
        _wait(bar_ptr, base + P)
        _stamp(ts, 5, pid)
        # ---- attention: left out (a barrier only) ----
        _arrive(bar_ptr)
        _wait(bar_ptr, base + 2 * P)
        _stamp(ts, 6, pid)
        # ---- o ----
        a = _vecs(attn_ptr, 0, 8, xl)
        mbarrier.wait(full.index(2), 0)
        _store(o_ptr, row_o, _matvec(o_s, a, L3), 8, rl)
        _phase_done(WS, empty.index(2), ts, 7, pid, bar_ptr)
        if not WS:
            mbarrier.expect(full.index(2), 3 * BOX16)
            for j in gl.static_range(3):  # down (its three column blocks) into the o buffer
                tma.async_copy_global_to_shared(dn_desc, [layer * H + row_o, j * 4, 0], full.index(2), dn_s.index(j))
        _wait(bar_ptr, base + 3 * P)
        _stamp(ts, 8, pid)
        # ---- gate/up ----
        h = _vecs(o_ptr, 0, 4, xl)
        mbarrier.wait(full.index(1), ph)
        for j in gl.static_range(3):
            g = _matvec(gu_s.index(j), h, L3)
            u = _matvec(gu_s.index(3 + j), h, L3)
            _store(act_ptr, row_g + j * 8, g / (1.0 + gl.exp(-g)) * u, 8, rl)
        _phase_done(WS, empty.index(1), ts, 9, pid, bar_ptr)
        if not WS:
            if more:
                _copy_gate_up(gu_desc, (layer + 1) * 2 * INTER + row_g, full.index(1), gu_s)
        _wait(bar_ptr, base + 4 * P)
        _stamp(ts, 10, pid)
        # ---- down ----
        if WS:
            # One box [8, 16, 256]: chunks 12-15, past the weight's 12, are zero-filled by TMA and masked here.
            c = gl.arange(0, 16, layout=gl.SliceLayout(1, xl))
            k = gl.arange(0, 256, layout=gl.SliceLayout(0, xl))
            offs = gl.expand_dims(c, 1) * 256 + gl.expand_dims(k, 0)
            xa = gl.load(act_ptr + offs, mask=offs < INTER, other=0.0, cache_modifier=".cg").to(gl.float32)
            mbarrier.wait(full.index(2), 1)
            y = _matvec(dn_s, xa, L3)
        else:
            mbarrier.wait(full.index(2), 1)
            y = _matvec(dn_s.index(0), _vecs(act_ptr, 0, 4, xl), L3)
            y += _matvec(dn_s.index(1), _vecs(act_ptr, 4, 4, xl), L3)
            y += _matvec(dn_s.index(2), _vecs(act_ptr, 8, 4, xl), L3)
        _store(down_ptr, row_o, y, 8, rl)
        # The next layer's first barrier: arrive now (without WS: refill the o buffer, and QKV's, while waiting).
        _phase_done(WS, empty.index(2), ts, 11, pid, bar_ptr)
        if not WS:
            if more:
                mbarrier.expect(full.index(2), O_BYTES)
                tma.async_copy_global_to_shared(o_desc, [(layer + 1) * H + row_o, 0, 0], full.index(2), o_s)
                if not AHEAD:
                    mbarrier.expect(full.index(0), QKV_BYTES)
                    tma.async_copy_global_to_shared(qkv_desc, [(layer + 1) * NQKV + row_q, 0, 0], full.index(0), q_s)


@gluon.jit
def _new_barriers(count: gl.constexpr):
    bars = gl.allocate_shared_memory(gl.int64, [count, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(count):
        mbarrier.init(bars.index(i), count=1)
    return bars


@gluon.jit
def gemv_layers(qkv_desc, o_desc, gu_desc, dn_desc, x_ptr, qkv_ptr, attn_ptr, o_ptr, act_ptr, down_ptr, bar_ptr,
                time_ptr, num_layers, AHEAD: gl.constexpr):  # fmt: skip
    # Weights are TMA'd as 3D boxes [rows, chunks of 256 columns, 256]: a program's QKV slice in one box, its o
    # slice in one, gate and up in three each, down in three (11 copies per layer), issued by the warps that
    # also compute and poll the barriers.
    pid = gl.program_id(0)
    dtype: gl.constexpr = qkv_desc.dtype
    q_s = gl.allocate_shared_memory(dtype, [32, 4, 256], qkv_desc.layout)
    gu_s = gl.allocate_shared_memory(dtype, [6, 8, 4, 256], gu_desc.layout)
    dn_s = gl.allocate_shared_memory(dtype, [3, 8, 4, 256], dn_desc.layout)
    o_s = dn_s._reinterpret(dtype, [8, 8, 256], o_desc.layout)  # o and down share one buffer (48 KiB)
    full = _new_barriers(3)  # QKV, gate/up, o/down: their copies have landed
    mbarrier.expect(full.index(0), QKV_BYTES)
    tma.async_copy_global_to_shared(qkv_desc, [pid * QKV_ROWS, 0, 0], full.index(0), q_s)
    _copy_gate_up(gu_desc, pid * GU_ROWS, full.index(1), gu_s)
    mbarrier.expect(full.index(2), O_BYTES)
    tma.async_copy_global_to_shared(o_desc, [pid * O_ROWS, 0, 0], full.index(2), o_s)
    _layers(qkv_desc, o_desc, gu_desc, dn_desc, q_s, gu_s, dn_s, o_s, full, full, qkv_ptr, attn_ptr, o_ptr,
            act_ptr, down_ptr, bar_ptr, time_ptr, pid, num_layers, False, AHEAD)  # fmt: skip


@gluon.jit
def _producer(qkv_desc, o_desc, gu_desc, dn_desc, q_s, gu_s, dn_s, o_s, full, empty, pid, num_layers):
    # One warp: streams each program's slices into shared memory in the order the phases use them, each copy as
    # soon as the phase that last read its buffer has released it (the `empty` barriers).
    row_q = pid * QKV_ROWS
    row_o = pid * O_ROWS
    row_g = pid * GU_ROWS
    for layer in range(num_layers):
        ph = layer & 1
        mbarrier.wait(empty.index(0), ph ^ 1)  # QKV of the last layer read (passes at once for layer 0)
        mbarrier.expect(full.index(0), QKV_BYTES)
        tma.async_copy_global_to_shared(qkv_desc, [layer * NQKV + row_q, 0, 0], full.index(0), q_s)
        mbarrier.wait(empty.index(2), 1)  # down of the last layer read
        mbarrier.expect(full.index(2), O_BYTES)
        tma.async_copy_global_to_shared(o_desc, [layer * H + row_o, 0, 0], full.index(2), o_s)
        mbarrier.wait(empty.index(1), ph ^ 1)  # gate/up of the last layer read
        _copy_gate_up(gu_desc, layer * 2 * INTER + row_g, full.index(1), gu_s)
        mbarrier.wait(empty.index(2), 0)  # this layer's o read
        mbarrier.expect(full.index(2), 2 * 8 * 16 * 256)  # the whole box: TMA counts its zero-filled part too
        tma.async_copy_global_to_shared(dn_desc, [layer * H + row_o, 0, 0], full.index(2), dn_s)


@gluon.jit
def _consumer(qkv_desc, o_desc, gu_desc, dn_desc, q_s, gu_s, dn_s, o_s, full, empty, qkv_ptr, attn_ptr, o_ptr,
              act_ptr, down_ptr, bar_ptr, time_ptr, pid, num_layers):  # fmt: skip
    _layers(qkv_desc, o_desc, gu_desc, dn_desc, q_s, gu_s, dn_s, o_s, full, empty, qkv_ptr, attn_ptr, o_ptr,
            act_ptr, down_ptr, bar_ptr, time_ptr, pid, num_layers, True, False)  # fmt: skip


@gluon.jit
def gemv_layers_ws(qkv_desc, o_desc, gu_desc, dn_desc, qkv_ptr, attn_ptr, o_ptr, act_ptr, down_ptr, bar_ptr,
                   time_ptr, num_layers):  # fmt: skip
    # As gemv_layers, with the copies issued by a producer warp (gl.warp_specialize) so the warps that poll the
    # grid barriers never issue them; down is one box [8, 16, 256] read past the weight's 12 chunks (zero-filled).
    pid = gl.program_id(0)
    dtype: gl.constexpr = qkv_desc.dtype
    q_s = gl.allocate_shared_memory(dtype, [32, 4, 256], qkv_desc.layout)
    gu_s = gl.allocate_shared_memory(dtype, [6, 8, 4, 256], gu_desc.layout)
    dn_s = gl.allocate_shared_memory(dtype, [8, 16, 256], dn_desc.layout)
    o_s = dn_s._reinterpret(dtype, [8, 8, 256], o_desc.layout)  # o and down share one buffer (64 KiB)
    full = _new_barriers(3)
    empty = _new_barriers(3)  # each buffer read: the producer may refill it
    descs_and_buffers = (qkv_desc, o_desc, gu_desc, dn_desc, q_s, gu_s, dn_s, o_s, full, empty)
    gl.warp_specialize(
        [
            (_consumer, descs_and_buffers + (qkv_ptr, attn_ptr, o_ptr, act_ptr, down_ptr, bar_ptr, time_ptr, pid,
                                             num_layers)),
            (_producer, descs_and_buffers + (pid, num_layers)),
        ],
        [1],
        [40],
    )  # fmt: skip


def main() -> None:
    """Build random Qwen3-0.6B-shaped weights, run the probe kernel in a CUDA graph, print µs per step and the
    spans per layer, write benchmarks/results/gluon_mega_probe.json."""
    from common import print_table, write_result
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from engine.layers.linear import graph_time_us

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    n = args.layers
    h, nqkv, qd, inter, p = (c.value for c in (H, NQKV, QD, INTER, P))
    w_qkv = torch.randn(n * nqkv, h, device=dev, dtype=dt) * 0.02
    w_o = torch.randn(n * h, qd, device=dev, dtype=dt) * 0.02
    w_gu = torch.randn(n * 2 * inter, h, device=dev, dtype=dt) * 0.02
    w_dn = torch.randn(n * h, inter, device=dev, dtype=dt) * 0.02
    lay = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
    descs = [
        TensorDescriptor.from_tensor(w_qkv.view(n * nqkv, 4, 256), [32, 4, 256], lay),
        TensorDescriptor.from_tensor(w_o.view(n * h, 8, 256), [8, 8, 256], lay),
        TensorDescriptor.from_tensor(w_gu.view(n * 2 * inter, 4, 256), [8, 4, 256], lay),
        TensorDescriptor.from_tensor(w_dn.view(n * h, 12, 256), [8, 4, 256], lay),
    ]
    x = torch.randn(h, device=dev, dtype=dt)
    bufs = [torch.zeros(k, device=dev, dtype=dt) for k in (nqkv, qd, h, inter, h)]
    bar = torch.zeros(1, device=dev, dtype=torch.int32)
    times = torch.zeros(p, n, STAMPS.value, device=dev, dtype=torch.int64)
    rows = []
    dn16 = TensorDescriptor.from_tensor(w_dn.view(n * h, 12, 256), [8, 16, 256], lay)
    for variant in ("ahead", "later", "producer_warp"):

        def step(variant=variant):
            bar.zero_()
            bufs[4].copy_(x)  # layer 0 reads its input where later layers read the down projection
            if variant == "producer_warp":
                gemv_layers_ws[(p,)](*descs[:3], dn16, *bufs, bar, times, n, num_warps=8)
            else:
                gemv_layers[(p,)](*descs, x, *bufs, bar, times, n, AHEAD=variant == "ahead", num_warps=8)

        step()
        torch.cuda.synchronize()
        # Check one layer against torch (layer 0's QKV from x: no norm in this probe).
        ref = (w_qkv[:nqkv].float() @ x.float()).to(dt)
        err = ((bufs[0].float() - ref.float()).norm() / ref.float().norm()).item() if n == 1 else None
        best = graph_time_us(step, args.reps)  # µs per step: the steps back to back in one CUDA graph
        rows.append(dict(variant=variant, layers=n, step_us=best, per_layer_us=best / n, layer0_qkv_rel_err=err))
        if n > 1:
            t = times.double().cpu() / 1000.0
            names = ["wait A", "x loads", "mbar wait qkv", "qkv compute", "arrive+TMA+wait B", "sync C",
                     "o (loads+wait+compute)", "arrive+TMA+wait D", "gate/up", "arrive+TMA+wait E", "down"]  # fmt: skip
            spans = [dict(span=nm, mean_us=(t[:, 1:, k + 1] - t[:, 1:, k]).mean().item(),
                          fastest_us=(t[:, 1:, k + 1] - t[:, 1:, k]).min(0).values.mean().item())
                     for k, nm in enumerate(names)]  # fmt: skip
            spans.append(dict(span="layer", mean_us=(t[:, 2:, 1] - t[:, 1:-1, 1]).mean().item(), fastest_us=0.0))
            print_table(f"spans per layer ({variant})", spans)
    print_table("Gluon TMA megakernel probe (projections + barriers, no attention)", rows)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    write_result("gluon_mega_probe", {"rows": rows}, out)


if __name__ == "__main__":
    main()
