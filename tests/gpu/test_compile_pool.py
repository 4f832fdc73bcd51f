"""Triton compiles of a first start in separate processes (engine/compile_pool.py), on the GPU: the launches' own
arguments, noted through Triton's hook, compile in workers, and the launches then load what the workers wrote."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def _cubin_folders(cache: Path) -> set[str]:
    # One folder per compiled kernel (its hash) holding the binary.
    return {p.parent.name for p in cache.rglob("*.cubin")}


def test_first_launches_compile_in_processes_and_the_launches_load_them(tmp_path, monkeypatch):
    """On an empty Triton cache, warm_in_threads has a GEMV's candidate configurations compiled in worker processes,
    and the launches that follow in the engine's process compile none of them again; the kernels compute the GEMV."""
    from engine import compile_pool
    from engine.layers import gemv
    from engine.layers.linear import warm_in_threads

    cache = tmp_path / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    monkeypatch.setenv("NANOVLLM_COMPILE_PROCESSES", "4")
    monkeypatch.setenv("NANOVLLM_COMPILE_THREADS", "4")
    gemv._build_kernel.cache_clear()  # a fresh kernel: nothing compiled for it in this process yet
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(1024, 2048, device="cuda", generator=g) / 2048**0.5).to(torch.bfloat16)
    x = torch.randn(1, 2048, device="cuda", generator=g).to(torch.bfloat16)
    configs = gemv.configs_for(1024, 2048)[:4]
    assert len(configs) == 4
    seen = {}
    compile_ahead = compile_pool.compile_ahead

    def spy(calls, run):
        seen["processes"] = compile_ahead(calls, run)
        seen["folders"] = _cubin_folders(cache)
        return seen["processes"]

    monkeypatch.setattr(compile_pool, "compile_ahead", spy)
    try:
        warm_in_threads([functools.partial(gemv._launch, x, w, cfg) for cfg in configs], x.device)
    finally:
        compile_pool.close_compile_pool()
    assert seen["processes"] == len(configs) and len(seen["folders"]) >= len(configs)
    assert _cubin_folders(cache) == seen["folders"]  # the launches in this process found every one in the cache
    ref, _ = gemv.reference_gemv(x, w)
    for cfg in configs:
        y, _ = gemv._launch(x, w, cfg)
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 1e-2, f"{cfg}: relative error {err:.2e}"
    assert _cubin_folders(cache) == seen["folders"]
