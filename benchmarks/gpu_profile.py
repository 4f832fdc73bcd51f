"""Where GPU time goes: kernel breakdown of a batch-1 decode step, and cuBLAS M=1 GEMM speed per weight layout.

Usage (on the GPU host, after `source .gpu-kit/setup.sh`):
    python benchmarks/gpu_profile.py kernels   # torch.profiler over graph-replayed decode steps, Qwen3-0.6B shapes
    python benchmarks/gpu_profile.py kernels --batch 256 --prompt 800   # the same at throughput batch sizes
    python benchmarks/gpu_profile.py gemv      # F.linear vs other layouts for the 0.6B decode GEMMs, in a CUDA graph
    python benchmarks/gpu_profile.py gemm --rows 1 64 256   # the same GEMMs per row count, layout, cuBLAS vs Lt
    python benchmarks/gpu_profile.py rowgemv --model Qwen3-8B   # one-row fused Triton GEMV configs vs cuBLAS
    python benchmarks/gpu_profile.py fewrows --few-rows 4 16 32   # few-row fused Triton GEMM configs vs cuBLAS
    python benchmarks/gpu_profile.py fewrows --few-rows 64 256    # the same kernel with wide row tiles (probe)
    python benchmarks/gpu_profile.py fewrows --model Qwen3-8B --quantization fp8 --few-rows 8 32   # FP8 weights
    python benchmarks/gpu_profile.py fewrows --quantization fp8 --plain --few-rows 8 64   # FP8 GEMMs alone
    python benchmarks/gpu_profile.py fp8gemm --few-rows 64 256   # FP8 weights: weight-only vs FP8 activations
    python benchmarks/gpu_profile.py fp8layer --few-rows 64 4096   # FP8 activations: quantized in the norms or not
    python benchmarks/gpu_profile.py fp8rows --few-rows 1 64 256   # FP8 x FP8: Triton few-row kernel vs cuBLASLt
    python benchmarks/gpu_profile.py overlap --batch 256 --prompt 560   # two micro-batches on two streams
    python benchmarks/gpu_profile.py prefill --batch 20 --prompt 800   # one large eager prefill step: kernels vs wall
    python benchmarks/gpu_profile.py start --steps 16   # the throughput workload's first steps, traced step by step
    python benchmarks/gpu_profile.py warm      # the prefix-cache benchmark's warm step: kernels, device span, host
    python benchmarks/gpu_profile.py plan      # host time of planning that warm step, in a hot loop
    python benchmarks/gpu_profile.py prefillsplit   # that warm step's attention per split-KV chunk size
    python benchmarks/gpu_profile.py decodeattn   # decode attention kernel families at batch 64-256
    python benchmarks/gpu_profile.py l2prefetch --slice-kib 96   # does a bulk L2 prefetch land in time?
    python benchmarks/gpu_profile.py sharedprefill --steps 6   # shared_prefix's 64-request prefill step, per round
    python benchmarks/gpu_profile.py prefillbackend   # FlashInfer paged prefill, fa2 vs fa3, per step shape
    python benchmarks/gpu_profile.py holistic   # FlashInfer's persistent BatchAttention vs prefill/decode kernels
    python benchmarks/gpu_profile.py sampler --rows 1 8 64   # the sampling kernels alone, against torch's path
Prints tables; writes benchmarks/results/gpu_profile_<which>.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from common import model_folder, print_table, write_result  # noqa: E402

OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None


def device_events(prof) -> tuple[list, float]:
    """The profile's GPU events, longest total first, and their total device time (us)."""
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    return events, sum(e.self_device_time_total for e in events)


def kernel_rows(events: list, total: float, most: int = 25) -> list[dict]:
    """Table rows of the longest GPU events: name, calls, total us and share of all kernel time."""
    return [
        dict(kernel=e.key[:80], calls=e.count, us=e.self_device_time_total, share=e.self_device_time_total / total)
        for e in events[:most]
    ]


def host_rows(prof, most: int = 20) -> list[dict]:
    """Table rows of the profile's host (CPU) events, longest self time first."""
    host = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    return [dict(event=e.key[:60], calls=e.count, us=e.self_cpu_time_total) for e in host[:most]]


def chrome_trace(prof, keep_as: str | None = None) -> dict:
    """The profile's chrome trace; keep_as also saves it under $OUT with that name."""
    import json

    path = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))  # a profile saves its trace once: copy the file for $OUT
    if keep_as is not None and OUT is not None:
        (OUT / keep_as).write_text(path.read_text())
    return json.loads(path.read_text())


def profiled_steps(prof, keep_as: str | None = None) -> list[dict]:
    """trace_steps() of the profile's chrome trace; keep_as also saves the trace under $OUT with that name."""
    return trace_steps(chrome_trace(prof, keep_as))


def profile_kernels(args) -> None:
    """GPU kernel time per decode step, by kernel (torch.profiler over graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    from engine import LLM, SamplingParams

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    rng = random.Random(0)
    if args.cascade:
        # The shared-prefix workload: 64 requests, a cached 4096-token prefix, --suffix own tokens each (64 as in
        # the benchmark; 192 gives the own KV lengths of its decode steps halfway through, 64 + 128 generated).
        cascade = args.cascade_attention == "on"
        llm = LLM(folder, load_format="dummy", max_model_len=8192, max_num_seqs=64, enable_cascade_attention=cascade)
        prefix = [rng.randrange(10, 30000) for _ in range(4096)]
        prompts = [prefix + [rng.randrange(10, 30000) for _ in range(args.suffix)] for _ in range(64)]
        llm.generate([prefix + [5]], SamplingParams(max_tokens=1))
    else:
        llm = LLM(folder, load_format="dummy", max_model_len=4096, max_num_seqs=max(8, args.batch))
        prompts = [[rng.randrange(10, 30000) for _ in range(args.prompt)] for _ in range(args.batch)]
    p = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.steps, ignore_eos=True)
    # Warm-up; it also puts the prompts' full blocks in the prefix cache, so the profiled run is mostly decode.
    llm.generate(prompts, p)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, p)
    llm.shutdown()
    critical = critical_path_rows(prof, args.steps)
    events, total = device_events(prof)
    rows = [
        dict(
            kernel=e.key[:80],
            calls=e.count,
            us_per_step=e.self_device_time_total / args.steps,
            us_per_call=e.self_device_time_total / max(e.count, 1),
            share=e.self_device_time_total / total,
        )
        for e in events[:25]
    ]
    what = f"batch {args.batch}, prompt {args.prompt}"
    if args.temperature:
        what += f", temperature {args.temperature:g}, top-p {args.top_p:g}"
    if args.cascade:
        what = f"64 requests, cascade {args.cascade_attention}, shared prefix 4096, own tokens {args.suffix}"
    print_table(f"{args.model}: GPU kernel time per decode step ({args.steps} steps, {what})", rows)
    print(f"total GPU kernel time per step: {total / args.steps:.0f} us")
    print_table("critical path: how far each kernel moves the step's end (overlapping launches count once)", critical)
    print(f"critical path per step: {sum(r['us_per_step'] for r in critical):.0f} us")
    write_result(
        "gpu_profile_kernels",
        {
            "model": args.model,
            "workload": what,
            "total_us_per_step": total / args.steps,
            "rows": rows,
            "critical_path": critical,
        },
        OUT,
    )


def critical_path_rows(prof, steps: int, most: int = 25) -> list[dict]:
    """Per kernel (name and grid), the time it adds to the end of the work before it, per step and per call.

    Why: with programmatic dependent launch a kernel starts while the one before still runs, so kernel durations
    overlap and their sum overstates the step; what each kernel adds past the latest end so far does not."""
    events = chrome_trace(prof)["traceEvents"]
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"), key=lambda e: e["ts"])
    added: dict[str, list[float]] = {}
    latest = None
    for e in gpu:
        end = e["ts"] + e["dur"]
        grid = e.get("args", {}).get("grid")
        key = f"{e['name'][:60]} {grid}" if grid else e["name"][:70]
        added.setdefault(key, []).append(end - latest if latest is not None and end > latest else 0.0)
        latest = end if latest is None else max(latest, end)
    rows = [
        dict(kernel=k, calls=len(v), us_per_step=sum(v) / steps, us_per_call=sum(v) / len(v)) for k, v in added.items()
    ]
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:most]


def profile_prefill(args) -> None:
    """GPU kernel time of one large prefill step (the throughput run's eager steps) against its wall time."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from engine import LLM, SamplingParams

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    tokens = args.batch * args.prompt
    llm = LLM(
        folder,
        load_format="dummy",
        max_model_len=4096,
        max_num_seqs=max(8, args.batch * args.chunks),
        max_num_batched_tokens=max(tokens, 2048),
        enable_prefix_caching=False,
    )
    rng = random.Random(0)
    p = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def prompts():
        return [[rng.randrange(10, 30000) for _ in range(args.prompt)] for _ in range(args.batch)]

    walls = []
    for _ in range(args.steps):
        batch = prompts()
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(batch, p)
        walls.append(time.perf_counter() - t)
    batch = prompts()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(batch, p)
    if args.chunks > 1:
        # Back-to-back chunks, as at the start of the throughput run: is the device idle between or inside them?
        mem0 = torch.cuda.memory_stats()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as chained:
            llm.generate([x for _ in range(args.chunks) for x in prompts()], p)
        mem1 = torch.cuda.memory_stats()
        keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
        print("allocator during the chained run:", {k: mem1.get(k, 0) - mem0.get(k, 0) for k in keys})
        print_table(f"host (CPU) time, {args.chunks} chained prefill steps (us)", host_rows(chained))
        if OUT is not None:
            chained.export_chrome_trace(str(OUT / "prefill_trace.json"))
    llm.shutdown()
    events, total = device_events(prof)
    rows = kernel_rows(events, total)
    what = f"{args.batch} requests x {args.prompt} tokens = {tokens} tokens, one step"
    print_table(f"{args.model}: GPU kernel time of one prefill step ({what})", rows)
    best = min(walls) * 1e6
    print(f"kernel time {total:.0f} us; generate() wall, best of {len(walls)}: {best:.0f} us")
    write_result(
        "gpu_profile_prefill",
        {"model": args.model, "workload": what, "kernel_us": total, "wall_us": sorted(w * 1e6 for w in walls),
         "rows": rows},
        OUT,
    )  # fmt: skip


def trace_steps(trace: dict) -> list[dict]:
    """Per-step span and busy time from a chrome trace: a step ends with its sampled tokens' device-to-host copy."""
    device_cats = ("kernel", "gpu_memcpy", "gpu_memset")
    events = trace["traceEvents"]
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in device_cats), key=lambda e: e["ts"])
    steps, current = [], []
    for e in gpu:
        current.append(e)
        if e["name"].startswith("Memcpy DtoH"):
            steps.append(current)
            current = []
    rows = []
    prev_end = None
    for i, evs in enumerate(steps):
        start, end = evs[0]["ts"], max(e["ts"] + e["dur"] for e in evs)
        kernels = sum(e["dur"] for e in evs)
        rows.append(dict(step=i, kernels=len(evs), span_ms=(end - start) / 1e3, busy_ms=kernels / 1e3,
                         idle_inside_ms=(end - start - kernels) / 1e3,
                         idle_before_ms=0.0 if prev_end is None else (start - prev_end) / 1e3))  # fmt: skip
        prev_end = end
    return rows


def profile_start(args) -> None:
    """The throughput workload's first steps (all its prefill chunks), traced: device idle inside and between."""

    from gpu_bench import throughput_workload
    from torch.profiler import ProfilerActivity, profile

    from engine import LLM, SamplingParams

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    prompts, params = throughput_workload(256, max_new_tokens=args.steps)  # outputs cut to --steps tokens
    llm = LLM(folder, load_format="dummy", max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=16384)
    host = None
    if args.host:
        # Host view instead: the engine thread under cProfile (it inflates host time; read it for where, not how much).
        from gpu_bench import profile_engine_thread

        host = profile_engine_thread(llm)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8))
    if host is not None:
        import pstats

        llm.generate(prompts, params)
        llm.shutdown()
        pstats.Stats(host).sort_stats("cumulative").print_stats(45)
        pstats.Stats(host).sort_stats("tottime").print_stats(25)
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params)
    llm.shutdown()
    rows = profiled_steps(prof)
    print_table(f"{args.model}: the throughput workload's first {len(rows)} steps (device ms)", rows)
    write_result("gpu_profile_start", {"model": args.model, "rows": rows}, OUT)


class HostTimer:
    """Wall time per call of the named methods (module, class or None, name), counted only while .active."""

    def __init__(self, targets: list[tuple[str, str | None, str]]):
        import importlib
        import inspect
        import time

        self.active = False
        self.totals: dict[str, list] = {}
        self.saved = []
        for module, cls_name, name in targets:
            # A class's method, or (cls_name None) a function as the named module sees it.
            cls = importlib.import_module(module)
            if cls_name is not None:
                cls = getattr(cls, cls_name)
            original = getattr(cls, name)
            key = f"{cls_name or module}.{name}"
            self.totals[key] = []
            self.saved.append((cls, name, inspect.getattr_static(cls, name)))  # a staticmethod stays one

            def timed(*a, _orig=original, _key=key, **kw):
                if not self.active:
                    return _orig(*a, **kw)
                t = time.perf_counter()
                try:
                    return _orig(*a, **kw)
                finally:
                    self.totals[_key].append((time.perf_counter() - t) * 1e6)

            setattr(cls, name, timed)

    def restore(self) -> None:
        """Put the original methods back."""
        for cls, name, original in self.saved:
            setattr(cls, name, original)


def profile_engine_steps(llm, prof, on: list[bool]) -> None:
    """Run the engine's steps under the cProfile profiler `prof` while on[0] is true."""
    step = llm.engine.step

    def profiled_step():
        """One engine step, profiled while on[0]."""
        if not on[0]:
            return step()
        prof.enable()
        try:
            return step()
        finally:
            prof.disable()

    llm.engine.step = profiled_step


def profile_warm(args) -> None:
    """The prefix_cache benchmark's warm request (4,096 cached tokens + 32 new), or with --request cold the cold
    one (4,096 new tokens): host time per call, kernels, device span and wall."""
    import time
    from statistics import median

    from torch.profiler import ProfilerActivity, profile

    from engine import LLM, SamplingParams

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    llm = LLM(folder, load_format="dummy", max_model_len=8192, max_num_seqs=16)
    rng = random.Random(0)
    p = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def pair():
        doc = [rng.randrange(10, 30000) for _ in range(4096)]
        return doc, doc + [rng.randrange(10, 30000) for _ in range(32)]

    ttfts, walls, queued, others = [], [], [], []
    timed_cold = args.request == "cold"
    host = HostTimer(
        [
            ("engine.scheduler", "Scheduler", "schedule"),
            ("engine.scheduler", "Scheduler", "commit"),
            ("engine.block_manager", "BlockManager", "find_cached_prefix"),
            ("engine.model_runner", "ModelRunner", "launch"),
            ("engine.model_runner", "ModelRunner", "collect"),
            ("engine.cuda_graphs", "GraphRunner", "prefill"),
            ("engine.attention.flashinfer_backend", "GraphPrefillAttention", "plan_step"),
            ("torch.cuda", "CUDAGraph", "replay"),
            ("engine.attention.flashinfer_backend", "StagedTables", "fill"),
            ("engine.attention.flashinfer_backend", "StagedTables", "send_indices"),
            ("flashinfer.prefill", "BatchPrefillWithPagedKVCacheWrapper", "plan"),
            ("engine.sampler", "Sampler", "sample"),
            ("engine.model_runner", "ModelRunner", "inputs_sent"),
            ("engine.llm_engine", "LLMEngine", "_flush_deliveries"),
            # the cold request's eager step
            ("engine.model_runner", "ModelRunner", "build_metadata"),
            ("engine.model_runner", "ModelRunner", "forward_hidden"),
            ("engine.attention.flashinfer_backend", "FlashInferBackend", "plan"),
        ]
    )
    for _ in range(args.steps):
        doc, warm = pair()
        first = [doc] if timed_cold else [warm]
        if not timed_cold:
            others.append(llm.generate([doc], p)[0].time_to_first_token)
        host.active = True
        t = time.perf_counter()
        out = llm.generate(first, p)[0]
        walls.append(time.perf_counter() - t)
        host.active = False
        if timed_cold:
            others.append(llm.generate([warm], p)[0].time_to_first_token)
        ttfts.append(out.time_to_first_token)
        queued.append(out.scheduled_time - out.arrival_time)
    host.restore()
    n = args.steps
    calls = {**host.totals, "arrival -> scheduled": [q * 1e6 for q in queued]}
    print_table(
        f"host time of the {args.request} requests ({n} rounds; per call: median and max)",
        [dict(call=k, calls=len(v) / n, us_per_request=sum(v) / n, median_us=median(v) if v else 0.0,
              max_us=max(v, default=0.0)) for k, v in calls.items()],
    )  # fmt: skip
    if args.cprofile:
        # Where the host time of one such request goes (cProfile inflates it: read it for where, not how much).
        import cProfile
        import pstats

        doc, warm = pair()
        if not timed_cold:
            llm.generate([doc], p)
        cprof, profiling = cProfile.Profile(), [True]
        profile_engine_steps(llm, cprof, profiling)
        llm.generate([doc] if timed_cold else [warm], p)
        profiling[0] = False
        print(f"the engine thread's steps of one {args.request} request (cProfile)")
        pstats.Stats(cprof).sort_stats("tottime").print_stats(40)
        pstats.Stats(cprof).sort_stats("cumulative").print_stats(30)
    doc, warm = pair()
    if not timed_cold:
        llm.generate([doc], p)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate([doc] if timed_cold else [warm], p)
    llm.shutdown()
    steps = profiled_steps(prof, keep_as=f"{args.request}_trace.json")
    events, total = device_events(prof)
    rows = kernel_rows(events, total)
    what = "cold step (4,096 new tokens)" if timed_cold else "warm step (4,096 cached + 32 new tokens)"
    print_table(f"{args.model}: GPU kernels of the {what}", rows)
    print_table("device spans (a step ends with its token copy)", steps)
    print_table("host (CPU) time (us)", host_rows(prof, 25))
    other = "warm" if timed_cold else "cold"
    print(
        f"kernel time {total:.0f} us; {args.request} TTFT median {median(ttfts) * 1e6:.0f} us, generate() wall "
        f"median {median(walls) * 1e6:.0f} us, {other} TTFT median {median(others) * 1e6:.0f} us over {n} rounds"
    )
    host_us = {k: dict(median_us=median(v), max_us=max(v), calls=len(v)) for k, v in calls.items() if v}
    write_result(
        "gpu_profile_warm" if not timed_cold else "gpu_profile_cold",
        {"model": args.model, "request": args.request, "kernel_us": total, "ttft_us": [x * 1e6 for x in ttfts],
         f"{other}_ttft_us": [x * 1e6 for x in others], "wall_us": [x * 1e6 for x in walls], "host_us": host_us,
         "steps": steps, "rows": rows},
        OUT,
    )  # fmt: skip


def profile_shared_prefill(args) -> None:
    """The shared_prefix benchmark's prefill phase: 64 requests on a cached 4,096-token prefix, each with its own
    64-token suffix, prefilled in one step. Rounds with fresh prefixes on one engine (cascade on, then off) show
    what the benchmark's single round pays once per engine; then host time per call and a device trace."""
    import cProfile
    import gc
    import pstats
    import time
    from statistics import median

    from torch.profiler import ProfilerActivity, profile

    from engine import LLM, SamplingParams

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    rng = random.Random(0)
    targets = [
        ("engine.scheduler", "Scheduler", "schedule"),
        ("engine.scheduler", "Scheduler", "commit"),
        ("engine.block_manager", "BlockManager", "find_cached_prefix"),
        ("engine.model_runner", "ModelRunner", "launch"),
        ("engine.model_runner", "ModelRunner", "collect"),
        ("engine.llm_engine", "LLMEngine", "add_requests"),
        ("engine.llm_engine", "LLMEngine", "_flush_deliveries"),
        ("engine.llm_engine", "LLMEngine", "shared_prefix_blocks"),
    ]
    rows, calls_rows = [], []
    gc_pauses: list[float] = []
    gc_start = [0.0]

    def on_gc(phase, info):
        """Time each collection (the engine's heap holds every request's token lists)."""
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_pauses.append((time.perf_counter() - gc_start[0]) * 1e3)

    gc.callbacks.append(on_gc)
    for cascade in (True, False):
        llm = LLM(folder, load_format="dummy", max_model_len=8192, max_num_seqs=64, enable_cascade_attention=cascade)
        host = HostTimer(targets)
        # The engine thread's steps under cProfile in round 1, the first whose prefill is followed by a decode step.
        cprof, profiling = cProfile.Profile(), [False]
        profile_engine_steps(llm, cprof, profiling)
        for r in range(args.steps):
            prefix = [rng.randrange(10, 30000) for _ in range(4096)]
            llm.generate([prefix + [5]], SamplingParams(max_tokens=1))  # the prefix enters the cache
            prompts = [prefix + [rng.randrange(10, 30000) for _ in range(64)] for _ in range(64)]
            new_tokens = 2 if r % 2 else 1  # 2: the first decode step is launched before the prefill is collected
            p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
            host.active = r == args.steps - 1
            profiling[0] = r == 1
            gc_pauses.clear()
            mem0 = torch.cuda.memory_stats()
            t = time.perf_counter()
            outs = llm.generate(prompts, p)
            wall = time.perf_counter() - t
            mem1 = torch.cuda.memory_stats()
            # cudaMalloc/cudaFree by the caching allocator (a free waits for the device: a hidden sync).
            keys = ("num_device_alloc", "num_device_free", "num_alloc_retries")
            mem = {k: mem1.get(k, 0) - mem0.get(k, 0) for k in keys}
            host.active = profiling[0] = False
            first = max(o.first_token_time for o in outs) - min(o.arrival_time for o in outs)
            rows.append(dict(cascade=cascade, round=r, new_tokens=new_tokens, prefill_phase_ms=first * 1e3,
                             wall_ms=wall * 1e3, gc_ms=sum(gc_pauses), cached=outs[0].num_cached_tokens,
                             mallocs=mem["num_device_alloc"], frees=mem["num_device_free"],
                             retries=mem["num_alloc_retries"]))  # fmt: skip
            print(rows[-1], flush=True)
        host.restore()
        print(f"cascade={cascade}: the engine thread's steps in round 1 (cProfile, cumulative)")
        pstats.Stats(cprof).sort_stats("cumulative").print_stats(30)
        calls_rows += [dict(cascade=cascade, call=k, calls=len(v), total_us=sum(v), median_us=median(v) if v else 0.0)
                       for k, v in host.totals.items()]  # fmt: skip
        prefix = [rng.randrange(10, 30000) for _ in range(4096)]
        llm.generate([prefix + [5]], SamplingParams(max_tokens=1))
        prompts = [prefix + [rng.randrange(10, 30000) for _ in range(64)] for _ in range(64)]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        llm.shutdown()
        label = "cascade" if cascade else "no_cascade"
        events, total = device_events(prof)
        print_table(f"{label}: GPU kernels of the prefill step and the first decode step", kernel_rows(events, total))
        print_table(f"{label}: device spans", profiled_steps(prof))
        print_table(f"{label}: host (CPU) time (us)", host_rows(prof, 20))
    print_table("prefill phase per round (ms): first token of the last request minus the first arrival", rows)
    gc.callbacks.remove(on_gc)
    print_table("host time per call in the last round (us)", calls_rows)
    write_result("gpu_profile_sharedprefill", {"model": args.model, "rounds": rows, "calls": calls_rows}, OUT)


def paged_batch(
    n: int, q_len: int, kv_len: int, shared: bool, page: int
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Page tables of n requests of q_len new tokens over kv_len KV tokens each, sharing their leading full pages
    when shared: (pages allocated, page indices, page indptr, query indptr, last page lengths), on the host."""
    pages = -(-kv_len // page)
    shared_pages = (kv_len - q_len) // page if shared else 0
    own = pages - shared_pages
    indices = torch.cat(
        [torch.cat([torch.arange(shared_pages), shared_pages + i * own + torch.arange(own)]) for i in range(n)]
    ).to(torch.int32)
    indptr = torch.arange(n + 1, dtype=torch.int32) * pages
    qo_indptr = torch.arange(n + 1, dtype=torch.int32) * q_len
    last = torch.full((n,), kv_len - (pages - 1) * page, dtype=torch.int32)
    return shared_pages + n * own, indices, indptr, qo_indptr, last


# (requests, query tokens each, KV tokens each, whether the requests share their first KV pages): the shared_prefix
# benchmark's suffix prefill, the same over distinct documents, short-prompt batches, and long prompts.
PREFILL_SHAPES = (
    (64, 64, 4160, True),
    (64, 64, 4160, False),
    (16, 100, 100, False),
    (32, 127, 1024, False),
    (8, 120, 2048, False),
    (8, 512, 512, False),
    (4, 1024, 1024, False),
    (2, 2048, 6144, False),
    (1, 4096, 4096, False),
)


def bench_prefill_backend(args) -> None:
    """FlashInfer's paged prefill attention, fa2 against fa3 (the eager steps' "auto" on sm90), per step shape:
    Qwen3-0.6B heads (16 query, 8 KV, head_dim 128), HND pages of 64 tokens, causal; each kernel timed in a CUDA
    graph of 28 calls (one step's layers)."""
    import flashinfer

    from engine.layers.linear import graph_time_us

    dev, dtype, page, hq, hkv, d = torch.device("cuda"), torch.bfloat16, 64, 16, 8, 128
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    rows = []
    for n, q_len, kv_len, shared in PREFILL_SHAPES:
        total_pages, indices, indptr, qo_indptr, last = paged_batch(n, q_len, kv_len, shared, page)
        cache = torch.randn(total_pages, 2, hkv, page, d, dtype=dtype, device=dev)
        q = torch.randn(n * q_len, hq, d, dtype=dtype, device=dev)
        row = dict(requests=n, q_tokens=q_len, kv_tokens=kv_len, shared_prefix=shared)
        outs = {}
        for backend in ("fa2", "fa3"):
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "HND", backend=backend)
            w.plan(qo_indptr, indptr, indices.to(dev), last, hq, hkv, d, page, causal=True, q_data_type=dtype,
                   kv_data_type=dtype)  # fmt: skip
            outs[backend] = w.run(q, cache)
            row[f"{backend}_us"] = graph_time_us(functools.partial(w.run, q, cache), 28)
        row["fa2_over_fa3"] = row["fa2_us"] / row["fa3_us"]
        row["max_abs_diff"] = (outs["fa2"].float() - outs["fa3"].float()).abs().max().item()
        rows.append(row)
        print(row, flush=True)
    print_table("paged prefill attention per call (us), fa2 vs fa3", rows)
    write_result("gpu_profile_prefillbackend", {"rows": rows}, OUT)


def bench_gemv(args) -> None:
    """cuBLAS M=1 GEMM time per weight layout for the Qwen3-0.6B decode shapes."""
    import torch.nn.functional as F

    from engine.layers.linear import graph_time_us

    shapes = gemm_shapes("Qwen3-0.6B")
    reps = 50
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wt = w.t().contiguous()  # [k, n]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        x8 = x.expand(8, k).contiguous()
        variants = {
            "F.linear(x, W[n,k])": (F.linear, x, w),
            "x @ Wt[k,n]": (torch.mm, x, wt),
            "mv(W, x)": (torch.mv, w, x[0]),
            "F.linear M=8 pad": (F.linear, x8, w),
        }
        for vname, (op, a, b) in variants.items():
            us = graph_time_us(lambda op=op, a=a, b=b: op(a, b), reps)
            rows.append(dict(gemm=name, variant=vname, us=us, tb_s=w.nbytes / us / 1e6))
    print_table("decode GEMMs (bf16, M=1), 50 back-to-back in one CUDA graph", rows)
    write_result("gpu_profile_gemv", {"rows": rows}, OUT)


def bench_gemm(args) -> None:
    """cuBLAS time of the Qwen3-0.6B GEMMs per row count, weight layout and BLAS library (cuBLAS vs cuBLASLt)."""
    import torch.nn.functional as F

    from engine.layers.linear import graph_time_us

    shapes = gemm_shapes(args.model)
    rows = []
    default_lib = torch.backends.cuda.preferred_blas_library()
    try:
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            w_col = w.t().contiguous().t()
            for m in args.rows:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = dict(gemm=name, rows=m)
                for lib in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(lib)
                    for layout, w_ in (("row", w), ("col", w_col)):
                        row[f"{lib}_{layout}_us"] = graph_time_us(lambda w_=w_, x=x: F.linear(x, w_), 20)
                row["best_tb_s"] = w.nbytes / min(v for k_, v in row.items() if k_.endswith("_us")) / 1e6
                rows.append(row)
    finally:
        torch.backends.cuda.preferred_blas_library(default_lib)
    print_table(f"{args.model} GEMMs (bf16), 20 back-to-back in one CUDA graph; default {default_lib}", rows)
    write_result("gpu_profile_gemm", {"model": args.model, "default_library": str(default_lib), "rows": rows}, OUT)


def role_weights(layers, role: str):
    """(the role's modules of as many layers as stream past the L2, its first weight, its output rows)."""
    from engine.layers.gemv import _role_modules
    from engine.layers.linear import TUNE_STREAM_BYTES

    _, lin, act = _role_modules(layers[0])[role]
    w = lin.weight
    count = -(-TUNE_STREAM_BYTES // w.nbytes)
    n = w.shape[0] // 2 if act is not None else w.shape[0]
    return [_role_modules(layer)[role] for layer in layers[:count]], w, n


def quant_kw(args) -> dict:
    """The LLM keyword for --quantization (none: the weights as loaded)."""
    return {} if args.quantization == "none" else {"quantization": args.quantization}


def result_suffix(args) -> str:
    """A result name's suffix for a model other than Qwen3-0.6B and for FP8 weights."""
    suffix = "" if args.model == "Qwen3-0.6B" else "_" + args.model.split("-")[-1].lower()
    return suffix + ("" if args.quantization == "none" else "_" + args.quantization)


def _compile_one(job) -> str | None:
    """Compile (by launching once on a role's shapes) one GEMV / few-row configuration; an error's name or None."""
    from types import SimpleNamespace

    from engine.layers.gemv import _launch, _launch_rows

    cfg, m, weight_rows, k, norm, silu, fp8, *x8 = job  # x8: FP8 activations too (fp8rows), [imprecise]
    try:
        w = torch.randn(weight_rows, k, device="cuda", dtype=torch.bfloat16)
        scale = torch.ones(weight_rows, device="cuda") if fp8 else None
        w = w.to(torch.float8_e4m3fn) if fp8 else w
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        nw = SimpleNamespace(weight=torch.ones(k, device="cuda", dtype=torch.bfloat16), eps=1e-6) if norm else None
        residual = torch.randn_like(x) if norm else None
        if x8:
            sx = torch.ones(m, 1, device="cuda")
            kw = dict(x_scale=sx, out_dtype=torch.bfloat16, imprecise=x8[0])
            _launch_rows(x.to(torch.float8_e4m3fn), w, cfg, scale=scale, **kw)
        else:
            (_launch if len(cfg) == 4 else _launch_rows)(x, w, cfg, norm=nw, residual=residual, silu=silu, scale=scale)
        torch.cuda.synchronize()
    except Exception as e:  # a tile too large for this GPU: the timing skips it too
        return f"{cfg} at {m} rows: {type(e).__name__}"
    return None


def precompile(layers, sweeps: dict[str, list[tuple]], row_counts, plain: bool = False) -> None:
    """Compile every configuration the sweep will time in parallel processes (Triton's on-disk cache keeps them):
    compiling 100+ configurations one by one took minutes of the timing run. plain: without the norm / SwiGLU."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    from engine.layers.gemv import _role_modules

    jobs = []
    for role, configs in sweeps.items():
        norm, lin, act = _role_modules(layers[0])[role]
        w, norm, act = lin.weight, None if plain else norm, None if plain else act
        for m in row_counts:
            jobs += [(c, m, w.shape[0], w.shape[1], norm is not None, act is not None, w.element_size() == 1)
                     for c in configs]  # fmt: skip
    start = time.perf_counter()
    workers = min(16, os.cpu_count() or 1, len(jobs))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = [f for f in pool.map(_compile_one, jobs) if f]
    print(f"compiled {len(jobs)} configurations in {time.perf_counter() - start:.1f}s on {workers} processes")
    if failed:
        print("did not compile: " + "; ".join(failed))


def bench_rowgemv(args) -> None:
    """Each one-row projection of a model: the fused Triton GEMV in every configuration vs the unfused path
    (cuBLAS + FlashInfer norm / activation), cycling through the model's own layer weights in one CUDA graph."""
    os.environ["NANOVLLM_GEMV"] = "0"  # measure every configuration here, not the engine's start-up choice

    from engine import LLM
    from engine.layers.gemv import ROLES, SWEEP_CONFIGS, SWEEP_FP8_CONFIGS, _time_role, configs_for, gemv_configs

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    llm = LLM(folder, load_format="dummy", max_model_len=1024, max_num_seqs=1, enforce_eager=True, **quant_kw(args))
    layers = llm.runner.model.layers
    sweeps = {}
    for role in ROLES:
        _, w, n = role_weights(layers, role)
        engine_configs = gemv_configs(w)
        sweep = SWEEP_FP8_CONFIGS if w.element_size() == 1 else SWEEP_CONFIGS
        sweeps[role] = configs_for(n, w.shape[1], engine_configs + sweep)
    precompile(layers, sweeps, [1])
    rows = []
    for role in ROLES:
        mods, w, n = role_weights(layers, role)
        base, times = _time_role(mods, sweeps[role])
        for cfg, us in sorted(times.items(), key=lambda kv: kv[1]):
            rows.append(
                dict(role=role, config=str(cfg), in_engine=cfg in gemv_configs(w), us=us, unfused_us=base,
                     ratio=us / base, tb_s=(w.nbytes + n * (2 if w.element_size() == 1 else 0)) / us / 1e6)
            )  # fmt: skip
    llm.shutdown()
    title = "one-row projections: Triton GEMV configs (rows, K step, warps, evict-first)"
    print_table(f"{args.model} ({args.quantization}) {title}", rows)
    write_result(f"gpu_profile_rowgemv{result_suffix(args)}", {"model": args.model, "rows": rows}, OUT)


def bench_fewrows(args) -> None:
    """Each projection at a few token rows (decode batches, small prefill steps): the few-row Triton kernel in
    every configuration vs the unfused path (FlashInfer norm / activation + cuBLAS), cycling through the model's
    own layer weights in one CUDA graph, with the weight layouts and one-row choices the engine starts with."""
    os.environ["NANOVLLM_GEMV_MAX_ROWS"] = "1"  # the engine's own few-row tuning is what this measures

    from engine import LLM
    from engine.layers.gemv import (
        GEMV_CONFIGS,
        MAX_ROWS,
        MULTI_CONFIGS,
        MULTI_MAX_ROWS,
        ROLES,
        ROWS_CONFIGS,
        SWEEP_CONFIGS,
        SWEEP_FP8_ROWS_CONFIGS,
        SWEEP_FP8_WIDE_ROWS_CONFIGS,
        SWEEP_MULTI_CONFIGS,
        SWEEP_ROWS_CONFIGS,
        SWEEP_WIDE_ROWS_CONFIGS,
        _time_role,
        configs_for,
        plan_tile,
        rows_configs_for,
    )

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    llm = LLM(folder, load_format="dummy", max_model_len=1024, max_num_seqs=1, **quant_kw(args))
    layers = llm.runner.model.layers
    fp8 = args.quantization == "fp8"

    def weights(role: str):
        # --plain: each role's GEMM alone, without the norm before it or the SwiGLU after it.
        mods, w, n = role_weights(layers, role)
        return ([(None, lin, None) for _, lin, _ in mods], w, w.shape[0]) if args.plain else (mods, w, n)

    def sweep_for(role: str, m: int) -> list[tuple]:
        # Past the engine's MAX_ROWS only the wide shapes: the few-row ones keep whole K steps of 256 columns
        # for every token row in shared memory. FP8 weights: the engine's tiles and those made for FP8.
        # Up to MULTI_MAX_ROWS rows of a row-major bf16 weight, the multi-row GEMV's shapes too.
        _, w, n = weights(role)
        if m <= MAX_ROWS:
            sweep = ROWS_CONFIGS + (SWEEP_FP8_ROWS_CONFIGS if fp8 else SWEEP_ROWS_CONFIGS)
        else:
            sweep = SWEEP_WIDE_ROWS_CONFIGS + (SWEEP_FP8_WIDE_ROWS_CONFIGS if fp8 else ())
        multi = m <= MULTI_MAX_ROWS and w.stride(1) == 1 and not fp8
        multi_sweep = sum(MULTI_CONFIGS.values(), GEMV_CONFIGS) + SWEEP_CONFIGS + SWEEP_MULTI_CONFIGS
        multi_sweep = tuple(dict.fromkeys(multi_sweep))
        return (configs_for(n, w.shape[1], multi_sweep) if multi else []) + rows_configs_for(n, w.shape[1], sweep)

    def engine_configs(m: int) -> tuple:
        # What the engine's start-up timing offers at m rows.
        return ROWS_CONFIGS + (MULTI_CONFIGS[plan_tile(m)] if m <= MULTI_MAX_ROWS else ())

    for m in args.few_rows:
        precompile(layers, {role: sweep_for(role, m) for role in ROLES}, [m], args.plain)
    rows = []
    for role in ROLES:
        mods, w, n = weights(role)
        for m in args.few_rows:
            base, times = _time_role(mods, sweep_for(role, m), m)
            for rank, (cfg, us) in enumerate(sorted(times.items(), key=lambda kv: kv[1])):
                rows.append(
                    dict(role=role, rows=m, config=str(cfg), in_engine=cfg in engine_configs(m), us=us,
                         unfused_us=base, ratio=us / base, tb_s=w.nbytes / us / 1e6, row_major=w.stride(1) == 1,
                         rank=rank)
                )  # fmt: skip
    llm.shutdown()
    title = "few-row projections: Triton configs (rows/program, K step, warps, stages, K splits), the 6 fastest"
    print_table(f"{args.model} ({args.quantization}) {title}", [r for r in rows if r["rank"] < 6])
    name = f"gpu_profile_fewrows{result_suffix(args)}{'_plain' if args.plain else ''}"
    write_result(name, {"model": args.model, "plain": args.plain, "rows": rows}, OUT)


def bench_fp8layer(args) -> None:
    """A decoder layer's four projections with the add + norms before qkv and gate/up and the SwiGLU before down
    (no attention: its output is a fixed input of o) at the given token rows: FP8 activations quantized inside the
    norm and SwiGLU kernels (the engine's path) or in kernels of their own, against the bf16 weights FP8 stands
    for with FlashInfer's norms and SwiGLU, cycling through as many layers as stream past the L2 in one CUDA
    graph."""
    import flashinfer
    import torch.nn.functional as F

    from engine import LLM
    from engine.layers import fp8
    from engine.layers.linear import TUNE_STREAM_BYTES, cycle_time_us

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    llm = LLM(folder, load_format="dummy", max_model_len=1024, max_num_seqs=1, enforce_eager=True, quantization="fp8")
    layers = llm.runner.model.layers
    fp8.ACT_MIN_ROWS = 1  # every row count here takes FP8 activations, as the engine's steps of 33+ rows do
    roles = [(lay.self_attn.qkv_proj, lay.self_attn.o_proj, lay.mlp.gate_up_proj, lay.mlp.down_proj) for lay in layers]
    layer_bytes = sum(lin.weight.nbytes for lin in roles[0])
    count = min(len(layers), -(-TUNE_STREAM_BYTES // layer_bytes))
    bf16 = [[fp8.dequantize_fp8(lin.weight, lin.weight_scale, torch.bfloat16) for lin in r] for r in roles[:count]]

    def fused(layer, x, residual, attn_out):
        qkv, residual = fp8.norm_fp8_linear(x, residual, layer.input_layernorm, layer.self_attn.qkv_proj)
        h = layer.self_attn.o_proj(attn_out)
        gate_up, residual = fp8.norm_fp8_linear(h, residual, layer.post_attention_layernorm, layer.mlp.gate_up_proj)
        return qkv, fp8.silu_fp8_linear(gate_up, layer.mlp.down_proj)

    def unfused(layer, x, residual, attn_out):  # the same Linear modules: quantize_rows before each GEMM
        x, residual = layer.input_layernorm(x, residual)
        qkv = layer.self_attn.qkv_proj(x)
        h, residual = layer.post_attention_layernorm(layer.self_attn.o_proj(attn_out), residual)
        return qkv, layer.mlp.down_proj(flashinfer.silu_and_mul(layer.mlp.gate_up_proj(h)))

    def bf16_weights(layer, weights, x, residual, attn_out):
        w_qkv, w_o, w_gate_up, w_down = weights
        x, residual = layer.input_layernorm(x, residual)
        qkv = F.linear(x, w_qkv)
        h, residual = layer.post_attention_layernorm(F.linear(attn_out, w_o), residual)
        return qkv, F.linear(flashinfer.silu_and_mul(F.linear(h, w_gate_up)), w_down)

    hidden, attn_width = roles[0][0].weight.shape[1], roles[0][1].weight.shape[1]
    rows = []
    for m in args.few_rows:
        x, residual = (torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        attn_out = torch.randn(m, attn_width, device="cuda", dtype=torch.bfloat16)
        variants = {
            "fp8_fused": [functools.partial(fused, lay, x, residual, attn_out) for lay in layers[:count]],
            "fp8_unfused": [functools.partial(unfused, lay, x, residual, attn_out) for lay in layers[:count]],
            "bf16": [functools.partial(bf16_weights, lay, w, x, residual, attn_out) for lay, w in zip(layers, bf16)],
        }
        row = dict(rows=m, layers_cycled=count)
        for name, calls in variants.items():
            row[f"{name}_us"] = cycle_time_us(calls)
        row["fused_vs_unfused"] = row["fp8_fused_us"] / row["fp8_unfused_us"]
        row["fused_vs_bf16"] = row["fp8_fused_us"] / row["bf16_us"]
        rows.append(row)
    llm.shutdown()
    print_table(f"{args.model} one layer's projections, norms and SwiGLU (us per layer, no attention)", rows)
    write_result(f"gpu_profile_fp8layer{result_suffix(args)}", {"model": args.model, "rows": rows}, OUT)


def fp8_role_inputs(layers, row_counts):
    """Per FP8 projection role and token row count: (role, its first weight, the role's Linears of as many layers
    as stream past the L2, the bf16 weights they stand for, rows, random bf16 activations x, x quantized per row
    as x8 and sx)."""
    from engine.layers.fp8 import dequantize_fp8, quantize_rows_torch
    from engine.layers.gemv import ROLES

    for role in ROLES:
        mods, w, _ = role_weights(layers, role)
        lins = [lin for _, lin, _ in mods]
        bf16 = [dequantize_fp8(lin.weight, lin.weight_scale, torch.bfloat16) for lin in lins]
        for m in row_counts:
            x = torch.randn(m, w.shape[1], device="cuda", dtype=torch.bfloat16)
            yield (role, w, lins, bf16, m, x, *quantize_rows_torch(x))


def bench_fp8rows(args) -> None:
    """Each projection of a model with FP8 weights, its activations quantized per token row beforehand, at the
    given token rows: cuBLASLt's FP8 GEMM (`torch._scaled_mm`, the engine's path from ACT_MIN_ROWS rows) against
    the few-row Triton kernel reading FP8 activations and weights (every SWEEP_FP8_ACT_CONFIGS shape, promoted to
    fp32 after each K step, and the fastest again without promoting), and cuBLAS on the bf16 weights FP8 stands for,
    each cycling through the layers' weights in one CUDA graph."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    import torch.nn.functional as F

    from engine import LLM
    from engine.layers.fp8 import SWEEP_FP8_ACT_CONFIGS, dequantize_fp8, fp8_scaled_mm
    from engine.layers.gemv import ROLES, _launch_rows, rows_configs_for
    from engine.layers.linear import cycle_time_us

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    llm = LLM(folder, load_format="dummy", max_model_len=1024, max_num_seqs=1, enforce_eager=True, quantization="fp8")
    layers = llm.runner.model.layers
    sweeps = {}
    for role in ROLES:
        _, w, _ = role_weights(layers, role)
        sweeps[role] = (w, rows_configs_for(w.shape[0], w.shape[1], SWEEP_FP8_ACT_CONFIGS))
    # Each shape promoted (the imprecise variant of the fastest compiles when timed).
    jobs = [(c, m, w.shape[0], w.shape[1], False, False, True, False)
            for w, configs in sweeps.values() for c in configs for m in args.few_rows]  # fmt: skip
    start = time.perf_counter()
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = [f for f in pool.map(_compile_one, jobs) if f]
    print(f"compiled {len(jobs)} configurations in {time.perf_counter() - start:.1f}s; failed: {failed}")

    def triton(x8, sx, lin, cfg, imprecise):
        kw = dict(scale=lin.weight_scale, x_scale=sx, out_dtype=torch.bfloat16, imprecise=imprecise)
        return _launch_rows(x8, lin.weight, cfg, **kw)[0]

    rows = []
    for role, w, lins, bf16, m, x, x8, sx in fp8_role_inputs(layers, args.few_rows):
        row = dict(role=role, rows=m)
        row["bf16_cublas_us"] = cycle_time_us([functools.partial(F.linear, x, wb) for wb in bf16])
        # configs={}: cuBLASLt at every row count (the engine's choice where it times faster).
        mm = [functools.partial(fp8_scaled_mm, x8, sx, lin.weight, lin.weight_scale, None, torch.bfloat16, {})
              for lin in lins]  # fmt: skip
        row["scaled_mm_us"] = cycle_time_us(mm)
        times = {}
        for cfg in sweeps[role][1]:
            try:
                times[cfg] = cycle_time_us([functools.partial(triton, x8, sx, lin, cfg, False) for lin in lins])
            except Exception as e:  # a tile too large for this GPU's shared memory
                print(f"{role} {m} {cfg}: {type(e).__name__}")
        if times:
            best = min(times, key=times.get)
            ranked = sorted(times, key=times.get)
            row.update(triton_us=times[best], triton_config=str(best), next_configs=str(ranked[1:4]))
            calls = [functools.partial(triton, x8, sx, lin, best, True) for lin in lins]
            row["triton_imprecise_us"] = cycle_time_us(calls)
            row["triton_vs_scaled_mm"] = times[best] / row["scaled_mm_us"]
            row["triton_vs_bf16"] = times[best] / row["bf16_cublas_us"]
            row["triton_tb_s"] = w.nbytes / times[best] / 1e6
            ref = (x8.float() * sx) @ dequantize_fp8(lins[0].weight, lins[0].weight_scale, torch.float32).t()
            y = triton(x8, sx, lins[0], best, False).float()
            row["triton_rel_err"] = ((y - ref).norm() / ref.norm()).item()
            row["all_us"] = {str(c): t for c, t in times.items()}
        rows.append(row)
    llm.shutdown()
    shown = [{k: v for k, v in r.items() if k not in ("all_us", "next_configs")} for r in rows]
    print_table(f"{args.model} FP8 x FP8 projections (us per call, cycling through the layers' weights)", shown)
    write_result(f"gpu_profile_fp8rows{result_suffix(args)}", {"model": args.model, "rows": rows}, OUT)


def bench_fp8gemm(args) -> None:
    """Each projection of a model with FP8 weights at the given token rows: the engine's weight-only path (the
    Triton kernels with the start-up timing's tiles up to MAX_FP8_ROWS rows, else the weight widened for cuBLAS),
    cuBLASLt's FP8 GEMM (`torch._scaled_mm`) on activations quantized beforehand, and with their quantization in
    the call (the engine's FP8-activation path, fp8_act_linear: up to MAX_ACT_ROWS rows the Triton FP8 x FP8
    kernel's default shape; and torch ops then cuBLASLt), against cuBLAS on the bf16 weights FP8 stands for, each
    cycling through the layers' weights in one CUDA graph."""
    import torch.nn.functional as F

    from engine import LLM
    from engine.layers import fp8
    from engine.layers.fp8 import fp8_act_linear, fp8_linear, quantize_rows_torch
    from engine.layers.linear import cycle_time_us

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    llm = LLM(folder, load_format="dummy", max_model_len=1024, max_num_seqs=1, enforce_eager=True, quantization="fp8")
    layers = llm.runner.model.layers
    fp8.ACT_MIN_ROWS = 0  # fp8_linear's weight-only paths; fp8_act_linear is timed on its own

    def scaled_mm(x8, sx, lin):
        scale_b = lin.weight_scale[None, :]
        return torch._scaled_mm(x8, lin.weight.t(), scale_a=sx, scale_b=scale_b, out_dtype=torch.bfloat16)

    def weight_only(x, lin):  # the Triton kernels up to MAX_FP8_ROWS rows, else the widened weight
        return fp8_linear(x, lin.weight, lin.weight_scale, None, lin.fp8_configs)

    def torch_quantize_then_scaled_mm(x, lin):
        return scaled_mm(*quantize_rows_torch(x), lin)

    rows = []
    for role, _, lins, bf16, m, x, x8, sx in fp8_role_inputs(layers, args.few_rows):
        variants = {
            "bf16_cublas": [functools.partial(F.linear, x, wb) for wb in bf16],
            "fp8_weight_only": [functools.partial(weight_only, x, lin) for lin in lins],
            "fp8_scaled_mm": [functools.partial(scaled_mm, x8, sx, lin) for lin in lins],
            "fp8_act": [functools.partial(fp8_act_linear, x, lin.weight, lin.weight_scale, None) for lin in lins],
            "fp8_torch_quant_scaled_mm": [functools.partial(torch_quantize_then_scaled_mm, x, lin) for lin in lins],
        }  # fmt: skip
        row = dict(role=role, rows=m)
        for name, calls in variants.items():
            try:
                row[f"{name}_us"] = cycle_time_us(calls)
            except RuntimeError as e:  # an FP8 GEMM this torch / GPU cannot run
                row[f"{name}_us"] = None
                print(f"{role} {m} {name}: {e}")
        base = row["bf16_cublas_us"]
        for name in variants:
            if row[f"{name}_us"] is not None:
                row[f"{name}_vs_bf16"] = row[f"{name}_us"] / base
        rows.append(row)
    llm.shutdown()
    print_table(f"{args.model} FP8 projections (us per call, cycling through the layers' weights)", rows)
    write_result(f"gpu_profile_fp8gemm{result_suffix(args)}", {"model": args.model, "rows": rows}, OUT)


def profile_plan(args) -> None:
    """Host time of planning the prefix-cache benchmark's warm step (32 new tokens over 4,128 cached ones, the
    32-token prefill graph) in a hot loop: the whole plan_step (for a new shape, and for the shape of the graph's
    last plan, which skips FlashInfer's plan()), its pinned page tables, the indices' copy, and
    FlashInfer's plan() given pinned tables (as plan_step does) or pageable ones with the lengths left to it (as
    the engine did before StagedTables)."""
    import time

    from engine import LLM
    from engine.attention.flashinfer_backend import PagedIndices

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    llm = LLM(folder, load_format="dummy", max_model_len=8192, max_num_seqs=16)
    attn = llm.runner.graphs.prefill_attn[32]
    st = attn.staged
    tables, kv_lens = [list(range(10, 75))], [4128]
    padded_tables, padded_lens = tables + [[0]] * (attn.rows - 1), kv_lens + [1] * (attn.rows - 1)
    q_lens = [32] + [0] * (attn.rows - 1)
    rows_n = st.fill(padded_tables, padded_lens, attn.block_size)
    st.fill_qo(q_lens)
    dev_indices = st.send_indices(rows_n, attn.kv_indices)
    indptr, _, last = PagedIndices.build(padded_tables, padded_lens, attn.block_size)
    qo = torch.tensor([0] + [32] * attn.rows, dtype=torch.int32)
    common = dict(head_dim_qk=attn.head_dim, causal=True, **attn._common())
    given = dict(seq_lens=st.seq_lens, max_token_per_sequence=32, max_sequence_kv=4128)

    def plan_step(again: bool):
        if not again:
            attn.planned_shape = None  # as a step of a new shape: FlashInfer's plan() runs
        attn.plan_step([32], tables, kv_lens, llm.runner.dummy_block)

    parts = {
        "plan_step": functools.partial(plan_step, False),
        "plan_step, the shape of the last plan (plan() skipped)": functools.partial(plan_step, True),
        "StagedTables.fill": lambda: st.fill(padded_tables, padded_lens, attn.block_size),
        "StagedTables.send_indices": lambda: st.send_indices(rows_n, attn.kv_indices),
        "FlashInfer plan(), pinned tables and lengths given": lambda: attn.prefill.plan(
            st.qo_indptr, st.indptr, dev_indices, st.last, **given, **common
        ),
        "FlashInfer plan(), pageable tables": lambda: attn.prefill.plan(qo, indptr, dev_indices, last, **common),
    }
    rows = []
    for name, fn in parts.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps * 10):
            fn()
        torch.cuda.synchronize()
        rows.append(dict(part=name, us=(time.perf_counter() - start) / (args.steps * 10) * 1e6))
    llm.shutdown()
    print_table(f"{args.model}: host time per call, hot loop of {args.steps * 10}", rows)
    write_result("gpu_profile_plan", {"model": args.model, "rows": rows}, OUT)


# stepab variants: (fused q/k + append inside attention, fewest pages per split, most pages attended in one split).
# The tenth session's runs 7-8 also timed L2 prefetches of the pages (before the PDL wait) and of the layer's next
# weights (after it): slower, dropped.
STEP_VARIANTS = {
    "separate": (False, 1, 0),
    "fused": (True, 1, 0),
    "fused_min2": (True, 2, 0),
    "fused_min3": (True, 3, 0),
    "fused_min4": (True, 4, 0),
    "fused_min8": (True, 8, 0),
    "fused_one2": (True, 1, 2),
    "fused_one3": (True, 1, 3),
}


def profile_stepab(args) -> None:
    """Decode step time of one engine (its graph recorded afresh and replayed: GraphRunner.decode_step_us) with
    each variant of the attention kernel (--variants, the first is the baseline), alternated round by round; per
    batch size and context.

    Why: engines built in turn differ by up to ~3% in step time with the same code (where their weights land),
    more than the kernel changes being compared; one engine toggled between variants does not."""
    from engine import LLM

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    rows = []
    for engine_no in range(args.engines):
        llm = LLM(folder, load_format="dummy", max_model_len=4096, max_num_seqs=8)
        graphs = llm.runner.graphs
        times: dict[tuple[str, int, int], list[float]] = {}
        for r in range(args.rounds):
            for name in args.variants if r % 2 == 0 else args.variants[::-1]:
                fused, min_pages, one_split = STEP_VARIANTS[name]
                for batch in args.batches:
                    attn = graphs.decode_attn[batch]
                    kernel = attn.split_decode
                    own = (attn.fused_decode, kernel.min_pages, kernel.one_split_pages)
                    attn.fused_decode, kernel.min_pages, kernel.one_split_pages = fused, min_pages, one_split
                    for context in args.contexts:
                        times.setdefault((name, batch, context), []).append(graphs.decode_step_us(context, batch))
                    attn.fused_decode, kernel.min_pages, kernel.one_split_pages = own
        llm.shutdown()
        for (name, batch, context), ts in times.items():
            base = min(times[(args.variants[0], batch, context)])
            rows.append(
                dict(
                    engine=engine_no,
                    variant=name,
                    batch=batch,
                    context=context,
                    step_us=min(ts),
                    over_first=min(ts) / base,
                )
            )
    print_table(f"{args.model}: decode step (us, best of {args.rounds} rounds)", rows)
    write_result("gpu_profile_stepab", {"model": args.model, "variants": STEP_VARIANTS, "rows": rows}, OUT)


def bench_prefill_split(args) -> None:
    """The prefix-cache warm step (32 new tokens over --contexts cached ones, in the 32-token prefill graph) per
    split-KV chunk size of its attention (--splits pages; 0 = FlashInfer's graph planner): every layer's attention
    alone in one CUDA graph (also with FlashInfer's zero-filled output, as before), and the whole step graph.
    Variants alternate round by round in one engine; best of --rounds."""
    from engine import LLM
    from engine.cuda_graphs import APPEND_POS, BATCH_IDX, IDS, ROPE_POS, SAMPLE_ROWS
    from engine.layers.linear import graph_time_us, replay_us

    folder = model_folder(args.model, Path(tempfile.mkdtemp()))
    llm = LLM(folder, load_format="dummy", max_model_len=8192, max_num_seqs=16)
    runner, graphs, t = llm.runner, llm.runner.graphs, 32
    attn, s = graphs.prefill_attn[t], graphs.static
    bs, n_blocks = attn.block_size, runner.kv_cache[0].shape[0]
    q = torch.randn(t, attn.num_heads, attn.head_dim, dtype=attn.dtype, device=attn.device)
    plan = attn.prefill.plan
    # FlashInfer's graph-mode prefill grid: 2 CTAs per SM, over the KV heads (its planner's max_batch_size_if_split).
    budget = 2 * torch.cuda.get_device_properties(attn.device).multi_processor_count // attn.num_kv_heads
    times: dict[tuple[int, int, str], list[float]] = {}
    with torch.inference_mode():
        for r in range(args.rounds):
            for context in args.contexts:
                kv_len = context + t
                pages = -(-kv_len // bs)
                table = list(range(n_blocks - pages - 1, n_blocks - 1))  # distinct pages no request holds
                s[IDS, :t] = 0
                s[ROPE_POS, :t] = s[APPEND_POS, :t] = torch.arange(context, kv_len, device=s.device)
                s[BATCH_IDX, :t] = 0
                s[SAMPLE_ROWS, : attn.rows] = 0
                s[SAMPLE_ROWS, 0] = t - 1
                splits = args.splits if r % 2 == 0 else args.splits[::-1]
                for split in splits:
                    if split and (split >= pages or -(-pages // split) > budget):
                        continue  # one chunk (no split), or more chunks than FlashInfer's graph grid holds
                    # The engine leaves the chunk size to FlashInfer; a fixed one goes to plan() from here.
                    attn.prefill.plan = functools.partial(plan, fixed_split_size=split) if split else plan
                    attn.planned_shape = None  # the same shape, planned with another chunk size
                    attn.plan_step([t], [table], [kv_len], runner.dummy_block)
                    key = (context, split)
                    times.setdefault(key + ("attention",), []).append(
                        graph_time_us(lambda: [attn.attend(q, kv) for kv in runner.kv_cache], 4)
                    )
                    if split == 0:
                        times.setdefault(key + ("attention, zero-filled output",), []).append(
                            graph_time_us(lambda: [attn.prefill.run(q, kv) for kv in runner.kv_cache], 4)
                        )
                    step_graph = graphs.graphs[("prefill", t)][0]
                    step_graph.replay()  # once untimed after the new plan
                    times.setdefault(key + ("step graph",), []).append(replay_us(step_graph, 50))
    attn.prefill.plan = plan
    llm.shutdown()
    rows = []
    for (context, split, what), ts in sorted(times.items()):
        base = min(times[(context, 0, what if what != "attention, zero-filled output" else "attention")])
        rows.append(dict(context=context, split_pages=split or "auto", what=what, us=min(ts), over_auto=min(ts) / base))
    print_table(f"{args.model}: warm prefill step per split-KV chunk (us, best of {args.rounds} rounds)", rows)
    write_result("gpu_profile_prefillsplit", {"model": args.model, "rows": rows}, OUT)


# (requests, query tokens each, KV tokens each, whether the requests share their first KV pages): the prefix-cache
# warm step, a batch-1 decode step, shared_prefix's decode steps without cascade and its suffix prefill, short prompts.
HOLISTIC_SHAPES = (
    (1, 32, 4128, False),
    (1, 1, 384, False),
    (64, 1, 4288, True),
    (64, 64, 4160, True),
    (16, 100, 100, False),
)


def bench_holistic(args) -> None:
    """FlashInfer's persistent BatchAttention (split-KV work and its merge in one launch) against the kernels the
    engine runs for the same step shape: fa2 paged prefill (split-KV plus a merge kernel) and, for one-token rows,
    paged decode on CUDA or tensor cores. Qwen3-0.6B heads, HND pages of 64 tokens, causal; each variant planned
    once and timed in a CUDA graph over 28 distinct KV caches (one step's layers, so KV comes from memory, not L2).
    BatchAttention is not among the GPU kit's precompiled kernels: its first plan() compiles it (~20 s there)."""
    import flashinfer

    from engine.layers.linear import graph_time_us

    dev, dtype, page, hq, hkv, d, layers = torch.device("cuda"), torch.bfloat16, 64, 16, 8, 128, 28
    rows = []

    def workspace() -> torch.Tensor:
        """A float workspace of its own for each wrapper: every plan is made before any variant runs."""
        return torch.empty(256 << 20, dtype=torch.uint8, device=dev)

    for n, q_len, kv_len, shared in HOLISTIC_SHAPES:
        total_pages, indices, indptr, qo_indptr, last = paged_batch(n, q_len, kv_len, shared, page)
        caches = [torch.randn(total_pages, 2, hkv, page, d, dtype=dtype, device=dev) for _ in range(layers)]
        kv_lens = torch.full((n,), kv_len, dtype=torch.int32)
        q = torch.randn(n * q_len, hq, d, dtype=dtype, device=dev)
        out = torch.empty_like(q)
        fa2 = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "HND", backend="fa2")
        fa2.plan(qo_indptr, indptr, indices.to(dev), last, hq, hkv, d, page, causal=True, q_data_type=dtype,
                 kv_data_type=dtype)  # fmt: skip
        variants = {"fa2 prefill + merge": fa2}
        if q_len == 1:
            for cores in (False, True):
                dw = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), "HND", use_tensor_cores=cores)
                dw.plan(indptr, indices.to(dev), last, hq, hkv, d, page, q_data_type=dtype, kv_data_type=dtype)
                name = "decode, tensor cores" if cores else "decode, CUDA cores"
                variants[name] = dw
        holistic = flashinfer.BatchAttention(kv_layout="HND")
        holistic.plan(qo_indptr.to(dev), indptr.to(dev), indices.to(dev), kv_lens.to(dev), hq, hkv, d, d, page,
                      causal=True, q_data_type=dtype, kv_data_type=dtype)  # fmt: skip
        variants["holistic (BatchAttention)"] = holistic
        reference = None
        kv_bytes = total_pages * page * hkv * d * 2 * 2  # distinct KV bytes: shared pages count once
        for name, wrapper in variants.items():
            wrapper.run(q, caches[0], out=out)
            got = out.float().clone()
            reference = got if reference is None else reference
            us = graph_time_us(functools.partial(run_layers, wrapper, q, caches, out), 2) / layers
            row = dict(requests=n, q_tokens=q_len, kv_tokens=kv_len, shared=shared, variant=name, us=us)
            row["kv_tb_s"] = kv_bytes / us / 1e6
            row["max_abs_diff"] = (got - reference).abs().max().item()
            rows.append(row)
            print(row, flush=True)
        del caches
        torch.cuda.empty_cache()
    print_table("attention per layer (us), FlashInfer kernel families per step shape", rows)
    write_result("gpu_profile_holistic", {"rows": rows}, OUT)


def run_layers(wrapper, q: torch.Tensor, caches: list[torch.Tensor], out: torch.Tensor) -> None:
    """One planned attention wrapper over each KV cache in turn."""
    for cache in caches:
        wrapper.run(q, cache, out=out)


def run_split(split, q: torch.Tensor, caches: list[torch.Tensor], tables: list[torch.Tensor]) -> None:
    """The engine's split-KV Triton decode over each KV cache in turn."""
    for cache in caches:
        split(q, cache, *tables)


def bench_decode_attention(args) -> None:
    """FlashInfer's decode attention per kernel family at throughput batch sizes: CUDA-core decode, tensor-core
    (the prefill kernel) on FlashAttention-2 with and without split-KV, and on FlashAttention-3, each planned once
    and timed in a CUDA graph over --layers distinct KV caches (Qwen3-0.6B heads, 64-token pages, HND); with
    --triton-splits also the engine's split-KV Triton kernel (triton_decode.py) at those splits. Prints microseconds
    per layer and the KV read rate."""
    import flashinfer

    from engine.attention.triton_decode import SplitDecode
    from engine.layers.linear import graph_time_us

    heads, kv_heads, dim, page = 16, 8, 128, 64
    dev, dt = torch.device("cuda"), torch.bfloat16
    variants = {
        "cuda cores, fa2": dict(use_tensor_cores=False, backend="fa2"),
        "tensor cores, fa2": dict(use_tensor_cores=True, backend="fa2"),
        "tensor cores, fa2, no split": dict(use_tensor_cores=True, backend="fa2", no_split=True),
        "tensor cores, fa3": dict(use_tensor_cores=True, backend="fa3"),
    }
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            pages = -(-context // page)
            caches = [
                torch.randn(batch * pages, 2, kv_heads, page, dim, device=dev, dtype=dt) for _ in range(args.layers)
            ]
            q = torch.randn(batch, heads, dim, device=dev, dtype=dt)
            indptr = torch.arange(batch + 1, dtype=torch.int32) * pages
            indices = torch.randperm(batch * pages, dtype=torch.int32)  # scattered pages, as a live cache has
            last = torch.full((batch,), context - (pages - 1) * page, dtype=torch.int32)
            kv_bytes = batch * context * kv_heads * dim * 2 * 2
            base = None
            for name, v in variants.items():
                opts = dict(v)
                no_split = opts.pop("no_split", False)
                wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    torch.zeros(256 << 20, dtype=torch.uint8, device=dev),
                    "HND",
                    use_cuda_graph=True,
                    paged_kv_indptr_buffer=indptr.to(dev),
                    paged_kv_indices_buffer=indices.to(dev),
                    paged_kv_last_page_len_buffer=last.to(dev),
                    **opts,
                )
                extra = {"disable_split_kv": True} if no_split else {}
                try:
                    wrapper.plan(indptr, indices, last, heads, kv_heads, dim, page, q_data_type=dt, kv_data_type=dt,
                                 **extra)  # fmt: skip
                    out = torch.empty_like(q)
                    us = graph_time_us(functools.partial(run_layers, wrapper, q, caches, out), 4) / len(caches)
                except Exception as e:  # a kernel family this build lacks is reported, not fatal
                    rows.append(dict(batch=batch, context=context, variant=name, error=str(e)[:80]))
                    continue
                base = base or us
                rows.append(
                    dict(
                        batch=batch,
                        context=context,
                        variant=name,
                        us=us,
                        tb_s=kv_bytes / us / 1e6,
                        over_first=us / base,
                    )
                )
            # The engine's own split-KV Triton kernel (merge inside), at each of --triton-splits.
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            tables = [t.to(dev) for t in (indptr, indices, last)]
            for splits in args.triton_splits:
                split = SplitDecode(batch, heads, kv_heads, dim, dev, sms, splits)
                us = graph_time_us(functools.partial(run_split, split, q, caches, tables), 4) / len(caches)
                rows.append(dict(batch=batch, context=context, variant=f"triton split-KV, {splits} splits", us=us,
                                 tb_s=kv_bytes / us / 1e6, over_first=us / base))  # fmt: skip
            del caches
            torch.cuda.empty_cache()
    print_table("decode attention per layer (us; KV read rate TB/s)", rows)
    write_result("gpu_profile_decodeattn", {"rows": rows}, OUT)


def gemm_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer of a Qwen3 model's shape."""
    from common import qwen3_config

    c = qwen3_config(model)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {
        "qkv": (q + 2 * kv, c.hidden_size),
        "o": (c.hidden_size, q),
        "gate_up": (2 * c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
        "lm_head": (c.vocab_size, c.hidden_size),
    }


@functools.cache
def _l2_probe_kernel():
    import triton
    import triton.language as tl

    from engine.layers.kernels import L2_PREFETCH_ASM

    prefetch_asm = tl.constexpr(L2_PREFETCH_ASM)
    timer_asm = tl.constexpr("mov.u64 $0, %globaltimer;")

    @triton.jit
    def l2_probe(w_ptr, out_ptr, time_ptr, delay_ns, NBYTES: tl.constexpr, PREFETCH: tl.constexpr):
        # Program pid: optionally ask L2 for its NBYTES slice (sm90 bulk prefetch, 16 KiB pieces), wait delay_ns,
        # then load the slice into registers (32 KiB at a time, all issued before any is used) and time that.
        pid = tl.program_id(0)
        zero = pid * 0
        base = w_ptr + pid.to(tl.int64) * (NBYTES // 2)
        t0 = tl.inline_asm_elementwise(timer_asm, "=l,r", [zero], dtype=tl.int64, is_pure=False, pack=1)
        if PREFETCH:
            for off in tl.static_range(0, NBYTES, 16384):
                tl.inline_asm_elementwise(
                    prefetch_asm, "=r,l,r", [base + off // 2, zero + 16384], dtype=tl.int32, is_pure=False, pack=1
                )
        now = tl.inline_asm_elementwise(timer_asm, "=l,r", [zero], dtype=tl.int64, is_pure=False, pack=1)
        while now - t0 < delay_ns:
            now = tl.inline_asm_elementwise(timer_asm, "=l,r", [zero], dtype=tl.int64, is_pure=False, pack=1)
        t1 = tl.inline_asm_elementwise(timer_asm, "=l,r", [zero], dtype=tl.int64, is_pure=False, pack=1)
        r = tl.arange(0, 16)
        c = tl.arange(0, 1024)
        acc = tl.zeros([16, 1024], dtype=tl.float32)
        for i in tl.static_range(NBYTES // 32768):
            acc += tl.load(base + i * 16384 + r[:, None] * 1024 + c[None, :]).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
        t2 = tl.inline_asm_elementwise(timer_asm, "=l,r", [zero], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(time_ptr + pid * 2, t1 - t0)
        tl.store(time_ptr + pid * 2 + 1, t2 - t1)

    return l2_probe


def bench_l2_prefetch(args) -> None:
    """Does an sm90 bulk L2 prefetch put a weight slice in L2 in time? 128 programs (one per SM) each load a
    --slice-kib slice into registers after waiting --delays µs, with and without prefetching it first; a fresh
    part of a 1 GiB buffer each time, so nothing is in L2 from before. Prints the load time (µs, mean and slowest
    program) per case."""
    programs = 128
    nbytes = args.slice_kib * 1024
    buf = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    per_call = programs * nbytes // 2
    out = torch.empty(programs, device="cuda", dtype=torch.float32)
    times = torch.empty(programs, 2, device="cuda", dtype=torch.int64)
    kernel = _l2_probe_kernel()
    rows, slot = [], 0
    for r in range(args.rounds):
        for delay in args.delays:
            for prefetch in (False, True):
                offset = (slot % (buf.numel() // per_call)) * per_call
                slot += 1
                kernel[(programs,)](
                    buf[offset:], out, times, int(delay * 1000), NBYTES=nbytes, PREFETCH=prefetch, num_warps=8
                )
                torch.cuda.synchronize()
                t = times.double().cpu() / 1000.0
                if r > 0:  # the first round compiles
                    load = t[:, 1]
                    rows.append(dict(delay_us=delay, prefetch=prefetch, load_mean_us=load.mean().item(),
                                     load_slowest_us=load.max().item()))  # fmt: skip
    merged: dict = {}
    for row in rows:
        merged.setdefault((row["delay_us"], row["prefetch"]), []).append(row)
    table = [
        {
            "delay_us": d,
            "prefetch": p,
            "load_mean_us": min(x["load_mean_us"] for x in rs),
            "load_slowest_us": min(x["load_slowest_us"] for x in rs),
            "slice_MB_total": programs * nbytes / 1e6,
        }
        for (d, p), rs in merged.items()
    ]
    print_table(
        f"L2 bulk prefetch probe: {programs} programs x {args.slice_kib} KiB (best of {args.rounds - 1})", table
    )
    write_result("gpu_profile_l2prefetch", {"slice_kib": args.slice_kib, "rows": table}, OUT)


def bench_overlap(args) -> None:
    """Would two micro-batches on two CUDA streams overlap one's KV-bound attention with the other's GEMMs?

    Qwen3-0.6B layer skeleton (the four GEMMs and FlashInfer tensor-core decode attention) for --batch requests of
    --prompt tokens each, 28 layers in one CUDA graph: the whole batch on one stream, vs two halves on one stream,
    vs two halves on two streams.
    """
    import flashinfer
    import torch.nn.functional as F

    from engine.layers.linear import graph_time_us

    shapes = gemm_shapes("Qwen3-0.6B")
    weights = {n: torch.randn(*shapes[n], device="cuda", dtype=torch.bfloat16) * 0.02 for n in shapes if n != "lm_head"}
    heads, kv_heads, dim, page = 16, 8, 128, 16
    pages_per_req = -(-args.prompt // page)
    cache = torch.randn(args.batch * pages_per_req, 2, kv_heads, page, dim, device="cuda", dtype=torch.bfloat16)

    def part(rows: int, first: int):
        # One micro-batch: its own activations, attention wrapper and workspace (two may run at once).
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.zeros(128 << 20, dtype=torch.uint8, device="cuda"), "HND", use_tensor_cores=True
        )
        indptr = torch.arange(rows + 1, dtype=torch.int32) * pages_per_req
        indices = torch.arange(first * pages_per_req, (first + rows) * pages_per_req, dtype=torch.int32)
        last = torch.full((rows,), args.prompt - (pages_per_req - 1) * page, dtype=torch.int32)
        wrapper.plan(indptr, indices, last, heads, kv_heads, dim, page, q_data_type=torch.bfloat16,
                     kv_data_type=torch.bfloat16)  # fmt: skip
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)

        def layers():
            h = x
            for _ in range(28):
                qkv = F.linear(h, weights["qkv"])
                q = qkv[:, : heads * dim].reshape(rows, heads, dim).contiguous()
                o = wrapper.run(q, cache).reshape(rows, heads * dim)
                h = F.linear(o, weights["o"])
                g = F.linear(h, weights["gate_up"])
                h = F.linear(g[:, :3072], weights["down"])
            return h

        return layers

    whole = part(args.batch, 0)
    a, b = part(args.batch // 2, 0), part(args.batch - args.batch // 2, args.batch // 2)
    side = torch.cuda.Stream()

    def two_streams():
        side.wait_stream(torch.cuda.current_stream())
        a()
        with torch.cuda.stream(side):
            b()
        torch.cuda.current_stream().wait_stream(side)

    rows = [
        dict(variant="whole batch, one stream", us=graph_time_us(whole, 3)),
        dict(variant="two halves, one stream", us=graph_time_us(lambda: (a(), b()), 3)),
        dict(variant="two halves, two streams", us=graph_time_us(two_streams, 3)),
    ]
    print_table(f"28-layer skeleton, batch {args.batch}, {args.prompt} tokens each (us per forward)", rows)
    write_result("gpu_profile_overlap", {"batch": args.batch, "prompt": args.prompt, "rows": rows}, OUT)


def torch_filtered_sample(logits, top_k, top_p, min_p) -> torch.Tensor:
    """engine/sampler.py's torch path at temperature 0.7 with filters: softmax, filter, exponential race."""
    from engine.sampler import filter_probs

    probs = filter_probs(torch.softmax(logits.float() / 0.7, -1), top_k, top_p, min_p)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def bench_sampler(args) -> None:
    """The sampling kernels alone (engine/layers/sample.py) on Qwen3's 151,936 bf16 logits per row count: greedy,
    temperature 0.7 and top-k 50 / top-p 0.9 for each --sample-blocks tiling (bucket pass, bin pass), against
    torch's filtered path (engine/sampler.py: softmax, sort, exponential race). Device time per call, from a CUDA
    graph of 20 calls (best of 3 replays)."""
    from engine.layers.linear import graph_time_us
    from engine.layers.sample import FusedSampler, sample_params

    device = torch.device("cuda")
    vocab = 151936
    rows_out = []
    for rows in args.rows:
        g = torch.Generator(device=device).manual_seed(rows)
        logits = (torch.randn(rows, vocab, device=device, generator=g) * 2).to(torch.bfloat16)
        params = sample_params(list(range(rows)), [0] * rows, [0.7] * rows, [50] * rows, [0.9] * rows).to(device)
        for tiling in args.sample_blocks:
            filter_block, bin_block = (int(x) for x in tiling.split(":"))
            s = FusedSampler(device, filter_block=filter_block, bin_block=bin_block)
            for name, call in (
                ("greedy", functools.partial(s, logits)),
                ("temperature 0.7", functools.partial(s, logits, params)),
                ("top-k 50, top-p 0.9", functools.partial(s, logits, params, filtered=True)),
            ):
                rows_out.append(dict(rows=rows, path=f"kernels {tiling}", sampling=name, us=graph_time_us(call)))
        filters = (torch.full((rows,), 50, device=device), torch.full((rows,), 0.9, device=device))
        call = functools.partial(torch_filtered_sample, logits, *filters, torch.zeros(rows, device=device))
        rows_out.append(dict(rows=rows, path="torch", sampling="top-k 50, top-p 0.9", us=graph_time_us(call)))
    print_table("Sampling on 151,936 bf16 logits: device time per call (us)", rows_out)
    write_result("gpu_profile_sampler", {"rows": rows_out})


def main() -> None:
    """Parse the command line and run one profile."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "which",
        choices=[
            "kernels",
            "gemv",
            "gemm",
            "rowgemv",
            "fewrows",
            "fp8gemm",
            "fp8layer",
            "fp8rows",
            "overlap",
            "prefill",
            "start",
            "warm",
            "plan",
            "stepab",
            "prefillsplit",
            "decodeattn",
            "l2prefetch",
            "sharedprefill",
            "prefillbackend",
            "holistic",
            "sampler",
        ],
    )
    parser.add_argument("--model", default="Qwen3-0.6B")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--cascade", action="store_true", help="kernels: the shared-prefix workload with cascade")
    parser.add_argument(
        "--cascade-attention", choices=["on", "off"], default="on", help="kernels --cascade: off = the baseline"
    )
    parser.add_argument("--suffix", type=int, default=64, help="kernels --cascade: own prompt tokens per request")
    parser.add_argument("--batch", type=int, default=1, help="kernels: concurrent requests (without --cascade)")
    parser.add_argument("--prompt", type=int, default=128, help="kernels: prompt tokens per request")
    parser.add_argument("--temperature", type=float, default=0.0, help="kernels: sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="kernels: sampling top-p (1: off)")
    parser.add_argument("--host", action="store_true", help="start: cProfile the engine thread instead")
    parser.add_argument("--request", choices=["warm", "cold"], default="warm", help="warm: which request to time")
    parser.add_argument("--cprofile", action="store_true", help="warm: also cProfile the engine steps of one request")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64, 128, 256], help="gemm, sampler: row counts")
    parser.add_argument("--few-rows", nargs="+", type=int, default=[4, 16, 32], help="fewrows: row counts")
    parser.add_argument(
        "--quantization", choices=["none", "fp8"], default="none", help="rowgemv, fewrows: the weights' format"
    )
    parser.add_argument("--plain", action="store_true", help="fewrows: each GEMM alone (no norm / SwiGLU fused)")
    parser.add_argument("--chunks", type=int, default=1, help="prefill: also profile this many steps back to back")
    parser.add_argument("--engines", type=int, default=2, help="stepab: engines built in turn")
    parser.add_argument("--rounds", type=int, default=5, help="stepab: timings per variant and context")
    parser.add_argument(
        "--contexts", nargs="+", type=int, default=None, help="stepab (192 384 2048), prefillsplit (1024 4096 8000)"
    )
    parser.add_argument("--splits", nargs="+", type=int, default=[0, 3, 4, 6, 8, 12, 17], help="prefillsplit: pages")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="stepab (1), decodeattn (64 128 256)")
    parser.add_argument("--layers", type=int, default=4, help="decodeattn: distinct KV caches cycled")
    parser.add_argument(
        "--triton-splits", nargs="*", type=int, default=[], help="decodeattn: also the engine's Triton kernel"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=list(STEP_VARIANTS), default=["separate", "fused", "fused_min8"], help="stepab"
    )
    parser.add_argument("--slice-kib", type=int, default=96, help="l2prefetch: KiB per program")
    parser.add_argument(
        "--sample-blocks", nargs="+", default=["2048:4096"], help="sampler: bucket-pass:bin-pass tokens per program"
    )
    parser.add_argument("--delays", nargs="+", type=float, default=[0, 2, 5, 10, 20], help="l2prefetch: µs")
    args = parser.parse_args()
    if args.contexts is None:
        args.contexts = {"prefillsplit": [1024, 4096, 8000], "decodeattn": [512, 1024]}.get(
            args.which, [192, 384, 2048]
        )
    if args.batches is None:
        args.batches = [64, 128, 256] if args.which == "decodeattn" else [1]
    which = {"kernels": profile_kernels, "gemv": bench_gemv, "gemm": bench_gemm, "rowgemv": bench_rowgemv}
    which.update(fewrows=bench_fewrows, fp8gemm=bench_fp8gemm, plan=profile_plan, stepab=profile_stepab)
    which.update(prefillsplit=bench_prefill_split, fp8layer=bench_fp8layer, fp8rows=bench_fp8rows)
    which.update(decodeattn=bench_decode_attention, l2prefetch=bench_l2_prefetch)
    which.update(prefill=profile_prefill, start=profile_start, overlap=bench_overlap, warm=profile_warm)
    which.update(sharedprefill=profile_shared_prefill, prefillbackend=bench_prefill_backend, holistic=bench_holistic)
    which.update(sampler=bench_sampler)
    which[args.which](args)


if __name__ == "__main__":
    main()
