"""GPU benchmarks on random weights with real Qwen3 shapes: decode, throughput, shared prefix, prefix cache.

Usage (on the GPU host, after `source .gpu-kit/setup.sh`):
    python benchmarks/gpu_bench.py decode --models Qwen3-0.6B Qwen3-8B
    python benchmarks/gpu_bench.py decode --models Qwen3-0.6B --batch 8 --skip-hf   # decode_batch8.json
    python benchmarks/gpu_bench.py throughput
    python benchmarks/gpu_bench.py shared_prefix
    python benchmarks/gpu_bench.py prefix_cache
    python benchmarks/gpu_bench.py cascade_crossover --new-tokens 64
    python benchmarks/gpu_bench.py skewed_decode --new-tokens 64
    python benchmarks/gpu_bench.py cold_prefill --ttft-rounds 5
    python benchmarks/gpu_bench.py startup --models Qwen3-0.6B --quantization none fp8
    python benchmarks/gpu_bench.py startup --models embedded        # also on the CPU
Each writes benchmarks/results/<name>.json (and a copy under $OUT when set).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from common import model_folder, print_table, qwen3_config, write_result  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402

OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
ROOT = Path(tempfile.mkdtemp())
ENGINE_KW: dict = {}  # engine settings from the command line (--block-size), for every engine a benchmark makes


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of repeats."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n / sorted(times)[len(times) // 2]


def weight_bytes(cfg, quantization: str = "none") -> int:
    """Bytes of weights read per decode step (embedding gather excluded, lm_head included): bf16, or with
    quantization "fp8" the layers' projections at one byte per weight plus one fp32 scale per output row."""
    h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = h * (nq + 2 * nkv) * hd + nq * hd * h + 3 * h * i
    if quantization == "fp8":
        rows = (nq + 2 * nkv) * hd + h + 2 * i + h
        return L * (per_layer + 4 * rows) + 2 * v * h
    return 2 * (L * per_layer + v * h)


def kv_bytes_per_token(cfg) -> int:
    """bf16 K and V bytes of one token across layers."""
    return 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim


def free_engine(llm) -> None:
    """Shut the engine down and give its GPU memory back before the next measurement."""
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def profile_engine_thread(llm):
    """Run the engine's loop thread under cProfile (it starts on the first request)."""
    import cProfile

    prof = cProfile.Profile()
    loop = llm.engine._loop

    def profiled():
        """The engine loop, under the profiler."""
        prof.enable()
        try:
            loop()
        finally:
            prof.disable()

    llm.engine._loop = profiled
    return prof


def print_step_timing(llm, label: str, wall_s: float | None = None) -> dict | None:
    """Host time per step by phase and device time per step kind, when NANOVLLM_STEP_TIMING is set."""
    st = llm.engine.step_timing
    if not st:
        return None
    n = st["steps"]
    skip = ("gpu_s_", "n_", "idle_s_", "gc_")
    host = {k: v / n * 1e6 for k, v in st.items() if k != "steps" and not k.startswith(skip)}
    print(f"{label} host time per step over {n} steps (us): " + ", ".join(f"{k}={v:.0f}" for k, v in host.items()))
    gc_pauses = {g: (st[f"gc_gen{g}_n"], st[f"gc_gen{g}_s"]) for g in range(3) if f"gc_gen{g}_n" in st}
    pauses = ", ".join(f"gen{g} {cnt} x, {sec * 1e3:.1f} ms total" for g, (cnt, sec) in gc_pauses.items())
    print(f"{label} garbage-collection pauses: {pauses or 'none'}")
    kinds = sorted(k[len("n_") :] for k in st if k.startswith("n_"))
    gpu = {k: dict(steps=st[f"n_{k}"], total_s=st[f"gpu_s_{k}"], us_per_step=st[f"gpu_s_{k}"] / st[f"n_{k}"] * 1e6,
                   idle_before_s=st.get(f"idle_s_{k}", 0.0)) for k in kinds}  # fmt: skip
    for k, g in gpu.items():
        print(
            f"{label} device time, {k}: {g['steps']} steps, {g['us_per_step']:.0f} us/step, {g['total_s']:.3f} s; "
            f"device idle before these steps {g['idle_before_s']:.3f} s"
        )
    busy = sum(g["total_s"] for g in gpu.values())
    if wall_s:
        print(f"{label} device busy {busy:.3f} s of {wall_s:.3f} s wall ({busy / wall_s:.0%})")
    return dict(host_us_per_step=host, device=gpu, device_busy_s=busy, gc_pauses=gc_pauses)


def hf_decode_tok_s(cfg, prompt_len: int, new_tokens: int) -> float:
    """HF transformers generate() with a static cache and torch.compile, batch 1."""
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    # A static cache makes generate() compile the decoding forward itself (transformers' auto-compile); wrapping
    # forward in torch.compile(mode="reduce-overhead") by hand fails in transformers 5.17 (CUDA-graph overwrite).
    model.generation_config.cache_implementation = "static"
    ids = torch.randint(10, 30000, (1, prompt_len), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    for _ in range(2):
        model.generate(ids, **kw)
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return new_tokens / dt


def bench_decode(args) -> None:
    """decode.json: batch-1 decode tok/s of the engine, HF generate() and the weight-streaming floor."""
    bw = copy_bandwidth()
    rows = []
    for name, quant in [(m, q) for m in args.models for q in args.quantization]:
        cfg = qwen3_config(name)
        folder = model_folder(name, ROOT)
        kw = {**ENGINE_KW, **({"quantization": quant} if quant != "none" else {})}
        llm = LLM(folder, load_format="dummy", max_model_len=4096, max_num_seqs=args.max_num_seqs, **kw)
        prof = profile_engine_thread(llm) if args.profile else None
        rng = random.Random(0)
        batch = [[rng.randrange(10, 30000) for _ in range(128)] for _ in range(args.batch)]
        p = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        llm.generate(batch, p)  # warm-up
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            outs = llm.generate(batch, p)
            wall = time.perf_counter() - t
            # Decode phase: from the last first token to the last finish (every request decodes throughout).
            first = max(o.first_token_time for o in outs)
            last = max(o.finish_time for o in outs)
            decode = args.batch * (args.new_tokens - 1) / (last - first)
            runs.append((decode, args.batch * args.new_tokens / wall))
        runs.sort()
        engine_decode, engine_e2e = runs[1]
        if prof is not None:
            llm.shutdown()
            import pstats

            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        print_step_timing(llm, name)
        free_engine(llm)
        hf = float("nan")
        if not args.skip_hf and args.batch == 1 and quant == "none":
            try:
                hf = hf_decode_tok_s(cfg, 128, args.new_tokens)
            except Exception as exc:  # noqa: BLE001 - a baseline failure must not lose the engine numbers
                print(f"HF baseline failed: {type(exc).__name__}: {str(exc)[:300]}")
        step_bytes = weight_bytes(cfg, quant) + args.batch * kv_bytes_per_token(cfg) * (128 + args.new_tokens // 2)
        floor = args.batch * bw / step_bytes
        rows.append(
            dict(
                model=name,
                weights="bf16" if quant == "none" else quant,
                batch=args.batch,
                engine_tok_s=engine_decode,
                engine_e2e_tok_s=engine_e2e,
                hf_tok_s=hf,
                floor_tok_s=floor,
                engine_over_floor=engine_decode / floor,
                engine_over_hf=engine_decode / hf,
            )
        )
        print_table(f"decode, batch {args.batch}, prompt 128", rows)
    suffix = "" if args.quantization == ["none"] else "_" + "_".join(args.quantization)
    write_result(
        ("decode" if args.batch == 1 else f"decode_batch{args.batch}") + suffix,
        {"copy_bandwidth_bytes_s": bw, "prompt_len": 128, "new_tokens": args.new_tokens, "rows": rows},
        OUT,
    )


def bench_decode_ab(args) -> None:
    """decode_ab.json: decode tok/s of engines that differ only in one environment variable, all built in this
    process and run in turn, round after round (the order reversed every other round).

    Why: on H100s the same code decodes up to ~7% faster or slower from one process to the next (docs/benchmarks.md),
    more than the changes being measured; engines that share a process, card and time compare more closely."""
    name = args.models[0]
    folder = model_folder(name, ROOT)
    engines = []
    labels = {}  # value -> what its rows call it
    for value in args.ab_values:
        # A value with "=" in it sets variables of its own ("A=1,B=2"; "-": none); others set --ab-env.
        if value == "-" or "=" in value:
            settings = dict(p.split("=", 1) for p in value.split(",")) if value != "-" else {}
            labels[value] = value
        else:
            settings = {args.ab_env: value}
            labels[value] = f"{args.ab_env}={value}"
        # Read while the engine is built and its graphs are captured; the caller's settings come back after, so the
        # recorded command shows them and each row names its engine's value.
        with mock.patch.dict(os.environ, settings):
            kw = dict(max_model_len=4096, max_num_seqs=args.max_num_seqs, num_kvcache_blocks=args.ab_kv_blocks)
            engines.append((value, LLM(folder, load_format="dummy", **kw, **ENGINE_KW)))
    p = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, logprobs=args.ab_logprobs)
    rows = []
    for requests in args.ab_batches or [args.batch]:
        for prompt_len in args.ab_prompts:
            rng = random.Random(0)
            batch = [[rng.randrange(10, 30000) for _ in range(prompt_len)] for _ in range(requests)]
            rates: dict[str, list[float]] = {value: [] for value, _ in engines}
            for _, llm in engines:
                llm.generate(batch, p)  # warm-up
            for r in range(args.rounds):
                for value, llm in engines if r % 2 == 0 else engines[::-1]:
                    outs = llm.generate(batch, p)
                    first = max(o.first_token_time for o in outs)
                    rates[value].append(requests * (args.new_tokens - 1) / (max(o.finish_time for o in outs) - first))
            base = sorted(rates[args.ab_values[0]])[args.rounds // 2]
            for value, runs in rates.items():
                median = sorted(runs)[len(runs) // 2]
                rows.append(
                    dict(
                        requests=requests,
                        prompt=prompt_len,
                        env=labels[value],
                        median_tok_s=median,
                        min_tok_s=min(runs),
                        max_tok_s=max(runs),
                        over_first=median / base,
                        rounds=[round(x, 1) for x in runs],
                    )
                )
            print(rows[-len(engines) :], flush=True)
    for _, llm in engines:
        free_engine(llm)
    print_table(f"{name}: decode A/B, {args.new_tokens} new tokens", rows)
    name_batch = "_".join(map(str, args.ab_batches)) if args.ab_batches else args.batch
    result = {"model": name, "batches": args.ab_batches or [args.batch], "prompts": args.ab_prompts}
    result["logprobs"] = args.ab_logprobs
    write_result(f"decode_ab_batch{name_batch}", {**result, "env": args.ab_env, "rows": rows}, OUT)


def throughput_workload(n: int, max_new_tokens: int | None = None):
    """nano-vllm's workload: n prompts of 100..1024 random token ids, 100..1024 new tokens each (capped), seed 0."""
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 30000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    cap = max_new_tokens or 1024
    params = [
        SamplingParams(temperature=0, max_tokens=min(rng.randint(100, 1024), cap), ignore_eos=True) for _ in range(n)
    ]
    return prompts, params


def bench_throughput(args) -> None:
    """throughput.json: nano-vllm's 256-request workload, with the bandwidth roofline and its arithmetic."""
    name = "Qwen3-0.6B"
    cfg = qwen3_config(name)
    folder = model_folder(name, ROOT)
    n = args.num_requests
    prompts, params = throughput_workload(n)
    llm = LLM(
        folder,
        load_format="dummy",
        max_model_len=4096,
        max_num_seqs=256,
        max_num_batched_tokens=args.batched_tokens,
        **ENGINE_KW,
    )
    prof = profile_engine_thread(llm) if args.profile else None
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8))
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    stats = llm.stats()
    timing = print_step_timing(llm, "throughput", wall)
    if prof is not None:
        llm.shutdown()
        import pstats

        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    free_engine(llm)
    out_tokens = sum(len(o.token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    bw = copy_bandwidth()
    # Roofline: every decode step streams the weights once plus each running request's KV; prefill is
    # compute-bound (2 * params FLOPs per token at ~700 TFLOP/s bf16 dense achievable).
    quant = ENGINE_KW.get("quantization", "none")
    w = weight_bytes(cfg, quant)  # FP8 weights: the projections at a byte per weight
    avg_ctx = sum(len(p) + pr.max_tokens / 2 for p, pr in zip(prompts, params)) / n
    steps = max(pr.max_tokens for pr in params)
    kv_read = out_tokens * avg_ctx * kv_bytes_per_token(cfg)
    decode_s = (steps * w + kv_read) / bw
    flops = 2 * (weight_bytes(cfg) / 2) * (in_tokens + out_tokens)  # 2 FLOPs per parameter (bf16 bytes / 2)
    compute_s = flops / 700e12
    roofline = out_tokens / max(decode_s, compute_s)
    row = dict(
        requests=n,
        weights="bf16" if quant == "none" else quant,
        output_tokens=out_tokens,
        prompt_tokens=in_tokens,
        wall_s=wall,
        engine_tok_s=out_tokens / wall,
        roofline_tok_s=roofline,
        engine_over_roofline=out_tokens / wall / roofline,
        preemptions=stats["num_preemptions"],
    )
    print_table("throughput (nano-vllm workload, Qwen3-0.6B shapes)", [row])
    arithmetic = (
        f"decode: {steps} steps x {w / 1e9:.2f} GB weights + {out_tokens} tokens x {avg_ctx:.0f} ctx x "
        f"{kv_bytes_per_token(cfg)} B KV = {(steps * w + kv_read) / 1e9:.1f} GB at {bw / 1e12:.2f} TB/s = "
        f"{decode_s:.2f} s; compute: {flops / 1e12:.1f} TFLOP at 700 TFLOP/s = {compute_s:.2f} s"
    )
    print(arithmetic)
    extra = {"step_timing": timing} if timing else {}
    name = "throughput" if quant == "none" else f"throughput_{quant}"
    write_result(name, {**row, "roofline_arithmetic": arithmetic, **extra}, OUT)


def bench_shared_prefix(args) -> None:
    """shared_prefix.json: 64 requests on a cached 4,096-token prefix (by default), cascade on and off."""
    name = "Qwen3-0.6B"
    folder = model_folder(name, ROOT)
    rng = random.Random(0)
    n, prefix_len = args.shared_requests, args.prefix_tokens
    prefix = [rng.randrange(10, 30000) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(10, 30000) for _ in range(64)] for _ in range(n)]
    p = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    res = {}
    for cascade in (True, False) if args.shared_first == "cascade" else (False, True):
        llm = LLM(
            folder,
            load_format="dummy",
            max_model_len=8192,
            max_num_seqs=max(8, n),
            enable_cascade_attention=cascade,
            **({"cascade_min_requests": args.cascade_min_requests} if args.cascade_min_requests else {}),
            **ENGINE_KW,
        )
        prof = profile_engine_thread(llm) if args.profile and cascade else None
        llm.generate([prefix + [5]], SamplingParams(max_tokens=1))  # the prefix enters the cache once
        if args.shared_warmup:
            # The same shapes once with other suffixes (two tokens each), so that the timed run pays no first-use
            # costs of its 64-request prefill step and cascade decode.
            others = [prefix + [t + 1 for t in q[prefix_len:]] for q in prompts]
            llm.generate(others, SamplingParams(max_tokens=2, ignore_eos=True))
        t = time.perf_counter()
        outs = llm.generate(prompts, p)
        wall = time.perf_counter() - t
        firsts = max(o.first_token_time for o in outs)
        decode_tok_s = decode_rate(outs)
        res["cascade" if cascade else "no_cascade"] = dict(
            tok_s=sum(len(o.token_ids) for o in outs) / wall,
            decode_tok_s=decode_tok_s,
            prefill_phase_s=firsts - min(o.arrival_time for o in outs),
            cascade_steps=llm.stats()["num_cascade_steps"],
        )
        print_step_timing(llm, "cascade" if cascade else "no cascade", wall)
        if prof is not None:
            llm.shutdown()
            import pstats

            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        free_engine(llm)
    row = dict(
        cascade_tok_s=res["cascade"]["tok_s"],
        no_cascade_tok_s=res["no_cascade"]["tok_s"],
        ratio=res["cascade"]["tok_s"] / res["no_cascade"]["tok_s"],
        cascade_decode_tok_s=res["cascade"]["decode_tok_s"],
        no_cascade_decode_tok_s=res["no_cascade"]["decode_tok_s"],
        decode_ratio=res["cascade"]["decode_tok_s"] / res["no_cascade"]["decode_tok_s"],
        cascade_steps=res["cascade"]["cascade_steps"],
        cascade_prefill_phase_s=res["cascade"]["prefill_phase_s"],
        no_cascade_prefill_phase_s=res["no_cascade"]["prefill_phase_s"],
        warmup=bool(args.shared_warmup),
        first=args.shared_first,
    )
    print_table(f"shared prefix: {n} requests, {prefix_len}-token prefix + 64, 256 new tokens", [row])
    write_result("shared_prefix", row, OUT)


def decode_rate(outs) -> float:
    """Output tokens per second between the batch's last first token and its last finish (the decode phase)."""
    first = max(o.first_token_time for o in outs)
    last = max(o.finish_time for o in outs)
    return sum(len(o.token_ids) - 1 for o in outs) / (last - first)


def engine_takes(llm, lens: list[int]) -> str:
    """Which decode graph the engine takes for a step of these contexts: "unsplit" or "split" (its twin)."""
    graphs = llm.runner.graphs
    size = next(s for s in graphs.sizes if s >= len(lens))
    attn = graphs.decode_attn[size]
    if size in graphs.twin_attn and graphs._takes_twin(attn, lens):
        attn = graphs.twin_attn[size]
    return "unsplit" if attn.whole_kv else "split"


def bench_skewed_decode(args) -> None:
    """skewed_decode.json: decode tok/s of batches whose first request has a long context among short ones, through
    the unsplit and the split-KV decode graph of the same engine (and through the engine's own choice), in turn.

    Why: unsplit, each request's KV is read by one program per KV head; one long context then takes its read
    serially while the rest of the GPU has finished. Where that starts to cost sets WHOLE_KV_MAX_OVER_MEAN. A size
    without a twin graph runs the same graph in both columns."""
    import engine.cuda_graphs as graphs_module

    name = args.models[0]
    folder = model_folder(name, ROOT)
    max_len = max(args.long_lens) + args.new_tokens + 64
    llm = LLM(folder, load_format="dummy", max_model_len=max_len, max_num_seqs=max(args.batches), **ENGINE_KW)
    rule, short_rule = graphs_module.whole_kv_pays, graphs_module.short_decode_pays
    variants = {"unsplit": lambda lens: True, "split": lambda lens: False, "engine": rule}
    never = lambda lens, limit: False  # noqa: E731  (the forced columns take no short-context Triton twin)
    rng = random.Random(0)
    p = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    try:
        for batch in args.batches:
            for long_len in args.long_lens:
                prompts = [
                    [rng.randrange(10, 30000) for _ in range(n)] for n in [long_len] + [args.short_len] * (batch - 1)
                ]
                # The prompts enter the prefix cache, so every measured round starts decoding all rows in one step.
                llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
                rates: dict[str, list[float]] = {v: [] for v in variants}
                order = list(variants)
                for r in range(args.rounds):
                    for v in order if r % 2 == 0 else order[::-1]:
                        graphs_module.whole_kv_pays = variants[v]
                        graphs_module.short_decode_pays = short_rule if v == "engine" else never
                        rates[v].append(decode_rate(llm.generate(prompts, p)))
                graphs_module.whole_kv_pays, graphs_module.short_decode_pays = rule, short_rule
                mid = args.new_tokens // 2  # the share halfway through the measured steps
                lens = [n + mid for n in [long_len] + [args.short_len] * (batch - 1)]
                med = {v: statistics.median(x) for v, x in rates.items()}
                rows.append(dict(requests=batch, long_tokens=long_len, short_tokens=args.short_len,
                                 long_share=lens[0] / sum(lens), long_over_mean=lens[0] * batch / sum(lens),
                                 unsplit_tok_s=med["unsplit"], split_tok_s=med["split"],
                                 engine_tok_s=med["engine"], unsplit_over_split=med["unsplit"] / med["split"],
                                 engine_takes=engine_takes(llm, lens)))  # fmt: skip
                print(rows[-1], flush=True)
    finally:
        graphs_module.whole_kv_pays, graphs_module.short_decode_pays = rule, short_rule
        free_engine(llm)
    print_table(f"{name}: skewed decode, one long context among short ones, {args.new_tokens} new tokens", rows)
    write_result("skewed_decode", {"model": name, "new_tokens": args.new_tokens, "rows": rows}, OUT)


def bench_cascade_crossover(args) -> None:
    """cascade_crossover.json: decode tok/s with and without cascade, over request counts and shared-prefix
    lengths, on one engine (its config is swapped between runs; the cascade graphs stay captured)."""
    folder = model_folder("Qwen3-0.6B", ROOT)
    rng = random.Random(0)
    llm = LLM(folder, load_format="dummy", max_model_len=8192, max_num_seqs=64, enable_cascade_attention=True,
              cascade_min_requests=2, cascade_min_prefix_tokens=16, cascade_min_shared_tokens=1,
              **ENGINE_KW)  # fmt: skip
    configs = {"cascade": llm.engine.config}
    configs["no_cascade"] = configs["cascade"].model_copy(update={"enable_cascade_attention": False})
    p = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    for n in args.requests:
        for prefix_len in args.prefixes:
            prefix = [rng.randrange(10, 30000) for _ in range(prefix_len)]
            prompts = [prefix + [rng.randrange(10, 30000) for _ in range(32)] for _ in range(n)]
            llm.generate([prefix + [5]], SamplingParams(max_tokens=1))  # the prefix enters the cache once
            best = {"cascade": 0.0, "no_cascade": 0.0}
            steps = llm.stats()["num_cascade_steps"]
            for _ in range(2):  # alternating, best of 2 each
                for label, cfg in configs.items():
                    llm.engine.config = cfg
                    best[label] = max(best[label], decode_rate(llm.generate(prompts, p)))
            rows.append(dict(requests=n, prefix_tokens=prefix_len, cascade_tok_s=best["cascade"],
                             no_cascade_tok_s=best["no_cascade"], ratio=best["cascade"] / best["no_cascade"],
                             cascade_steps=llm.stats()["num_cascade_steps"] - steps))  # fmt: skip
            print(rows[-1], flush=True)
    free_engine(llm)
    print_table(f"cascade crossover: decode tok/s, {args.new_tokens} new tokens, 32-token own suffix", rows)
    write_result("cascade_crossover", {"new_tokens": args.new_tokens, "rows": rows}, OUT)


def large_graph_steps(graphs) -> int:
    """How many steps the large prefill graphs have served so far (all sizes)."""
    return sum(graphs.prefill_replays.get(t, 0) for t in graphs.large_prefill_sizes)


@contextlib.contextmanager
def large_graph_path(graphs, how: str):
    """Within it, a prefill step that a large prefill graph could serve goes as `how` says: "rule" (the engine's
    GraphRunner.prefill_size chooses), "eager" (the large graphs set aside) or "graph" (every large graph pays)."""
    saved = graphs.prefill_sizes, graphs.eager_launch_ms
    if how == "eager":
        graphs.prefill_sizes = [t for t in saved[0] if t not in graphs.large_prefill_sizes]
    elif how == "graph":
        graphs.eager_launch_ms = float("inf")  # only eager steps reset it, and none runs here
    try:
        yield
    finally:
        graphs.prefill_sizes = saved[0]
        if how == "graph":
            graphs.eager_launch_ms = saved[1]


def cold_without_large_graphs(llm, rng, params) -> float:
    """TTFT of a fresh 4,096-token prompt with the large prefill graphs set aside (the step runs eagerly)."""
    with large_graph_path(llm.runner.graphs, "eager"):
        return llm.generate([[rng.randrange(10, 30000) for _ in range(4096)]], params)[0].time_to_first_token


def bench_prefix_cache(args) -> None:
    """prefix_cache.json: TTFT of a 4,096-token prompt cold, then warm with a new 32-token question."""
    name = "Qwen3-0.6B"
    folder = model_folder(name, ROOT)
    rng = random.Random(0)
    llm = LLM(folder, load_format="dummy", max_model_len=8192, max_num_seqs=16, **ENGINE_KW)
    p = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    pairs, eager_colds, cold_paths = [], [], []
    graphs = llm.runner.graphs
    large = graphs.large_prefill_sizes if graphs is not None else []
    # Round 0 loads every kernel variant (full and partial prefill); the other rounds are measured with fresh
    # documents. Medians of --rounds (default 10): both TTFTs vary from round to round (the cold one by up to a
    # third between runs), so three rounds did not settle a 0.3 ms change.
    for r in range(1 + args.ttft_rounds):
        if large and r % 2:
            eager_colds.append(cold_without_large_graphs(llm, rng, p))  # the same process's eager path, A/B
        doc = [rng.randrange(10, 30000) for _ in range(4096)]
        before = large_graph_steps(graphs) if large else 0
        cold = llm.generate([doc], p)[0]
        if large:  # whether the rule (GraphRunner.prefill_size) gave this cold step a graph
            cold_paths.append("graph" if large_graph_steps(graphs) > before else "eager")
        warm = llm.generate([doc + [rng.randrange(10, 30000) for _ in range(32)]], p)[0]
        pairs.append((cold.time_to_first_token, warm.time_to_first_token, warm.num_cached_tokens))
        if large and not r % 2:
            eager_colds.append(cold_without_large_graphs(llm, rng, p))
        print(
            f"cold: queue {cold.scheduled_time - cold.arrival_time:.4f}s prefill "
            f"{cold.first_token_time - cold.scheduled_time:.4f}s; warm: queue "
            f"{warm.scheduled_time - warm.arrival_time:.4f}s prefill {warm.first_token_time - warm.scheduled_time:.4f}s"
        )
    print_step_timing(llm, "prefix cache")
    free_engine(llm)
    measured = pairs[1:]
    cold_s = statistics.median(c for c, _, _ in measured)
    warm_s = statistics.median(w for _, w, _ in measured)
    row = dict(cold_ttft_s=cold_s, warm_ttft_s=warm_s, ratio=warm_s / cold_s, warm_cached_tokens=measured[0][2])
    if large:
        # The cold step eagerly, as without large prefill graphs (alternating with the measured rounds).
        row["cold_eager_ttft_s"] = statistics.median(eager_colds[1:])
        row["large_prefill_graphs"] = large
    print_table(f"prefix cache: TTFT for a 4096-token prompt, cold vs same prefix + 32 tokens (medians of "
                f"{len(measured)} rounds)", [row])  # fmt: skip
    row["rounds"] = [dict(cold_ttft_s=c, warm_ttft_s=w) for c, w, _ in measured]
    if large:
        row["large_prefill_replay_ms"] = graphs.large_replay_ms
        # The rule's inputs (GraphRunner.prefill_size), each the median of the latest three: eager prefill launches
        # (the A/B rounds'), how many times its launch/kernels a timed eager step took, how many times its
        # start-up replay a graph step took.
        row["eager_launch_ms"] = graphs.eager_launch_ms
        row["eager_excess"] = graphs.eager_excess
        row["device_pace"] = graphs.device_pace
        row["cold_paths"] = cold_paths[1:]  # graph or eager, per measured cold round
        row["cold_eager_rounds_s"] = eager_colds[1:]
    write_result("prefix_cache", row, OUT)


def bench_cold_prefill(args) -> None:
    """cold_prefill.json: TTFT of fresh prompts of several lengths three ways, alternating in one engine: the large
    prefill graph rule's own choice (GraphRunner.prefill_size), every step eager, every step on its graph. The
    model is the first of --models."""
    name = args.models[0]
    folder = model_folder(name, ROOT)
    rng = random.Random(0)
    llm = LLM(folder, load_format="dummy", max_model_len=8192, max_num_seqs=16, **ENGINE_KW)
    graphs = llm.runner.graphs
    if graphs is None or not graphs.large_replay_ms:
        raise SystemExit("cold_prefill needs CUDA graphs with NANOVLLM_LARGE_PREFILL_GRAPHS=auto")
    p = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def ttft(n: int, how: str) -> tuple[float, str, float, float, float, list[float]]:
        before = large_graph_steps(graphs)
        with large_graph_path(graphs, how):
            out = llm.generate([[rng.randrange(10, 30000) for _ in range(n)]], p)[0]
        took = large_graph_steps(graphs) > before
        # The rule's inputs when it chose (read after it: only the next choice settles this step's own timing).
        return (
            out.time_to_first_token,
            "graph" if took else "eager",
            graphs.eager_launch_ms,
            graphs.eager_excess,
            graphs.device_pace,
            list(graphs._launches),  # the launches whose median the rule read
        )

    rows = []
    for n in args.prompt_lens:
        ttft(n, "rule")  # loads this shape's kernels
        runs = {how: [] for how in ("rule", "eager", "graph")}
        for _ in range(args.ttft_rounds):
            for how in runs:
                runs[how].append(ttft(n, how))
        row = {"prompt_tokens": n, "graph_tokens": next(t for t in graphs.prefill_sizes if t >= n)}
        for how, got in runs.items():
            row[f"{how}_ttft_ms"] = statistics.median(r[0] for r in got) * 1e3
        row["rule_picked_graph"] = sum(r[1] == "graph" for r in runs["rule"])
        keys = ("ttft_ms", "path", "launch_ms", "excess", "pace", "recent_launches_ms")
        row["rule_rounds"] = [dict(zip(keys, (r[0] * 1e3, *r[1:]), strict=True)) for r in runs["rule"]]
        row["rounds"] = args.ttft_rounds
        rows.append(row)
    state = dict(replay_ms=graphs.large_replay_ms, eager_launch_ms=graphs.eager_launch_ms, excess=graphs.eager_excess)
    state["pace"] = graphs.device_pace
    free_engine(llm)
    print_table(f"{name} cold prefill TTFT (ms, medians of {args.ttft_rounds} rounds): the rule, eager, graph", rows)
    print(state)
    write_result("cold_prefill", {"model": name, "rows": rows, **state}, OUT)


def bytecode_cache_env(keep_setting: bool) -> tuple[dict, float | None]:
    """Environment for start-up children that read compiled bytecode as a pip-installed environment does (pip writes
    every package's .pyc at install): where this Python writes none (PYTHONDONTWRITEBYTECODE, as on the GPU host),
    a fresh PYTHONPYCACHEPREFIX folder filled once by compileall over sys.path's folders. Without it each child
    compiles ~2,300 modules from source, ~3 s of a later start that no user pays. keep_setting: leave it as it is.
    Returns the environment and compileall's seconds (None where nothing was compiled)."""
    env = dict(os.environ)
    if keep_setting or not (sys.flags.dont_write_bytecode or env.get("PYTHONDONTWRITEBYTECODE")):
        return env, None
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="pycache-")
    folders = sorted({str(Path(p).resolve()) for p in sys.path if p and Path(p).is_dir()})
    start = time.perf_counter()
    # Some packages ship files that do not compile (templates, other Pythons' code): compileall's status is moot.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *folders], env=env, capture_output=True)
    seconds = time.perf_counter() - start
    print(f"bytecode for {len(folders)} sys.path folders compiled in {seconds:.1f}s")
    return env, seconds


def bench_startup(args) -> None:
    """startup.json: how long `LLM(model)` takes with the engine's defaults (max_num_seqs 256, every CUDA graph),
    per phase (LLM.startup_seconds), and the first request after it. Each engine starts in a fresh process, first
    with an empty Triton cache and no kept start-up choices (cold: every Triton kernel the start-up timings try
    compiles, as on a user's first run), then again on the caches that left (warm: later runs, which read the
    timings' choices from NANOVLLM_TUNE_CACHE; "0" there times them again, for A/B runs). Weights are random
    (load_format="dummy"), so the load phase here is not a checkpoint's read, except for the model name `embedded`:
    the embedded SmolLM2 GGUF, whose first load converts it into an empty NANOVLLM_GGUF_CACHE and whose warm load
    reads that copy (this one runs on the CPU too). Children read compiled bytecode, as an installed environment
    does (bytecode_cache_env)."""
    rows = []
    base_env, compile_s = bytecode_cache_env(args.without_bytecode)
    for name, quant in [(m, q) for m in args.models for q in args.quantization]:
        # The folder is made here, so that the child's LLM() is the first to import the config and tokenizer
        # modules of transformers, as a user's start does (making it imports them too).
        folder = [] if name == "embedded" else ["--folder", str(model_folder(name, ROOT))]
        caches = {
            "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-cache-"),
            "NANOVLLM_GGUF_CACHE": tempfile.mkdtemp(prefix="gguf-cache-"),
            "NANOVLLM_TUNE_CACHE": tempfile.mkdtemp(prefix="tune-cache-"),
        }
        for kept in ("NANOVLLM_GGUF_CACHE", "NANOVLLM_TUNE_CACHE"):
            if os.environ.get(kept) == "0":  # the cache off: every load converts or times again (A/B runs)
                del caches[kept]
        for state in args.states:  # "warm" runs on the caches "cold" left, when both run
            cmd = [sys.executable, __file__, "startup_child", "--models", name, "--quantization", quant, *folder]
            if args.block_size:
                cmd += ["--block-size", str(args.block_size)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env={**base_env, **caches}, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
                raise SystemExit(f"startup of {name} ({quant}, {state} Triton cache) failed: exit {proc.returncode}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            phases = child.pop("phases")
            # The engine's own start-up lines (what it tuned and captured, and in how long) go with the figures.
            child["engine_log"] = [line for line in proc.stderr.splitlines() if line.startswith("engine")]
            rows.append(
                dict(
                    model=name,
                    weights=child.pop("dtype") if quant == "none" else quant,
                    caches=state,
                    bytecode="as set" if args.without_bytecode else "compiled",
                    process_s=wall,
                    **{f"{phase}_s": seconds for phase, seconds in phases.items()},
                    **child,
                )
            )
            table = [{k: v for k, v in row.items() if k != "engine_log"} for row in rows]
            print_table("engine start-up, seconds (process: the whole child, Python's imports included)", table)
    result = {"rows": rows, "bytecode_compile_s": compile_s}
    write_result("startup" if torch.cuda.is_available() else "startup_cpu", result, OUT)


def startup_child(args) -> None:
    """One engine's start-up for bench_startup: prints its phases and first request as the last line of JSON."""
    if args.models[0] == "embedded":
        llm = LLM(None, **ENGINE_KW)
    else:
        folder = args.folder or model_folder(args.models[0], ROOT)
        llm = LLM(folder, load_format="dummy", **ENGINE_KW)  # main() put the one --quantization into ENGINE_KW
    prompt = [random.Random(0).randrange(10, 30000) for _ in range(128)]
    start = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    first_request = time.perf_counter() - start
    result = dict(
        phases=llm.startup_seconds,
        dtype=str(llm.dtype).removeprefix("torch."),
        first_request_s=first_request,
        first_ttft_s=out.time_to_first_token,
        cuda_graphs=len(llm.runner.graphs.graphs) if llm.runner.graphs is not None else 0,
        max_memory_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
    )
    llm.shutdown()
    print(json.dumps(result))


def main() -> None:
    """Parse the command line and run one benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "which",
        choices=[
            "decode",
            "decode_ab",
            "throughput",
            "shared_prefix",
            "prefix_cache",
            "cascade_crossover",
            "skewed_decode",
            "cold_prefill",
            "startup",
            "startup_child",  # one engine of `startup`, in its own process
        ],
    )
    parser.add_argument("--models", nargs="+", default=["Qwen3-0.6B", "Qwen3-8B"])
    parser.add_argument("--folder", help="startup_child: the model folder bench_startup made for it")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="decode: concurrent requests (HF: batch 1 only)")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--batched-tokens", type=int, default=16384)
    parser.add_argument("--block-size", type=int, help="tokens per KV cache block (default: the engine's)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--quantization", nargs="+", choices=("none", "fp8"), default=["none"],
        help="engine weights (decode, startup: one engine per value, in turn; others: one value)",
    )  # fmt: skip
    parser.add_argument("--shared-requests", type=int, default=64, help="shared_prefix: concurrent requests")
    parser.add_argument("--prefix-tokens", type=int, default=4096, help="shared_prefix: shared prefix length")
    parser.add_argument("--shared-warmup", type=int, choices=(0, 1), default=1, help="shared_prefix: warm-up run")
    parser.add_argument("--shared-first", choices=("cascade", "no_cascade"), default="cascade", help="shared_prefix")
    parser.add_argument("--requests", nargs="+", type=int, default=[4, 8, 16, 32, 64], help="cascade_crossover")
    parser.add_argument("--prefixes", nargs="+", type=int, default=[128, 256, 1024, 4096], help="cascade_crossover")
    parser.add_argument("--cascade-min-requests", type=int, help="shared_prefix (default: the engine's)")
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64, 128], help="skewed_decode: requests")
    parser.add_argument(
        "--long-lens", nargs="+", type=int, default=[1024, 4096, 16384], help="skewed_decode: the long context"
    )
    parser.add_argument("--short-len", type=int, default=256, help="skewed_decode: the other requests' prompts")
    parser.add_argument(
        "--states", nargs="+", choices=("cold", "warm"), default=["cold", "warm"], help="startup: Triton cache states"
    )
    parser.add_argument(
        "--without-bytecode", action="store_true",
        help="startup: children keep this environment's bytecode setting (PYTHONDONTWRITEBYTECODE: compile every "
        "module from source, as the thirty-third session's and earlier figures did)",
    )  # fmt: skip
    parser.add_argument("--ab-env", default="NANOVLLM_FUSED_DECODE", help="decode_ab: the variable that differs")
    parser.add_argument(
        "--ab-values", nargs="+", default=["0", "1"], help="decode_ab: one engine per value (or A=1,B=2; -: none)"
    )
    parser.add_argument("--ab-logprobs", type=int, default=None, help="decode_ab: top logprobs each token returns")
    parser.add_argument("--rounds", type=int, default=6, help="decode_ab, skewed_decode: timed runs each")
    parser.add_argument("--ttft-rounds", type=int, default=10, help="prefix_cache, cold_prefill: measured rounds")
    lens = [900, 2100, 3000, 3500, 4096]
    parser.add_argument("--prompt-lens", nargs="+", type=int, default=lens, help="cold_prefill: prompt tokens")
    parser.add_argument("--ab-prompts", nargs="+", type=int, default=[128], help="decode_ab: prompt tokens")
    parser.add_argument("--ab-batches", nargs="+", type=int, help="decode_ab: requests (default: --batch)")
    parser.add_argument("--ab-kv-blocks", type=int, default=256, help="decode_ab: KV cache blocks per engine")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the engine thread (decode, throughput, shared_prefix)"
    )
    args = parser.parse_args()
    most = max(args.ab_batches or [args.batch])
    if most > args.max_num_seqs:
        parser.error(f"batches of {most} requests need --max-num-seqs of at least {most} (it is {args.max_num_seqs})")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the engine's start-up choices
    if args.block_size:
        ENGINE_KW["block_size"] = args.block_size
    if args.which not in ("decode", "startup"):
        if len(args.quantization) > 1:
            parser.error(f"--quantization takes one value for {args.which} (several only for decode)")
        if args.quantization[0] != "none":
            ENGINE_KW["quantization"] = args.quantization[0]
    {
        "decode": bench_decode,
        "decode_ab": bench_decode_ab,
        "throughput": bench_throughput,
        "shared_prefix": bench_shared_prefix,
        "prefix_cache": bench_prefix_cache,
        "cascade_crossover": bench_cascade_crossover,
        "skewed_decode": bench_skewed_decode,
        "cold_prefill": bench_cold_prefill,
        "startup": bench_startup,
        "startup_child": startup_child,
    }[args.which](args)


if __name__ == "__main__":
    main()
