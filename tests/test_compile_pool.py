"""Triton compiles in separate processes (engine/compile_pool.py): a worker's compile is the one the engine's own
launch looks up. Runs without a GPU: Triton compiles for an sm90 target with its own ptxas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from engine import compile_pool  # noqa: E402


def _cubin_folders(cache: Path) -> set[str]:
    # One folder per compiled kernel (its hash) holding the binary; launcher and utility builds hold none.
    return {p.parent.name for p in cache.rglob("*.cubin")}


def _quantize_job(cache: Path) -> tuple[compile_pool.CompileJob, object]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    from engine.layers.fp8 import _build_quantize_kernel

    kernel = _build_quantize_kernel()
    target = GPUTarget("cuda", 90, 32)
    ptrs = {name: "*bf16" for name in ("x_ptr", "r_ptr", "w_ptr")} | {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32"}
    signature = ptrs | {"K": "i32", "stride_x": "i32", "stride_r": "i32", "eps": "fp32"}
    signature |= {name: "constexpr" for name in ("MODE", "HAS_RESIDUAL", "BLOCK_K", "FP8_MAX")}
    constants = {(9,): 1, (10,): True, (11,): 1024, (12,): 448.0}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    # The options as a launch's hook hands them over: Triton's own, through JSON (tuples come back as lists).
    options = json.loads(json.dumps(make_backend(target).parse_options({"num_warps": 4}).__dict__))
    job = compile_pool.CompileJob(
        kernel.fn.__module__, kernel.fn.__qualname__, signature, constants, attrs, compile_pool._tuples(options),
        target, str(cache), compile_pool.kernel_environ(),
    )  # fmt: skip
    return job, kernel


def test_a_kernel_compiled_in_a_worker_is_what_the_launch_finds(tmp_path, monkeypatch):
    """A worker process rebuilds the kernel from its factory and compiles it into the cache; the engine's process
    then finds it there (is_cached) and compiles nothing when it runs the same compile itself. Before the worker,
    the cache has nothing for it."""
    from triton.compiler import ASTSource

    cache = tmp_path / "triton"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))  # Triton reads it on each lookup
    job, kernel = _quantize_job(cache)
    assert not compile_pool.is_cached(job, kernel)

    monkeypatch.setenv("NANOVLLM_COMPILE_PROCESSES", "2")
    try:
        seconds = compile_pool._executor(2).submit(job).result(timeout=300)
    finally:
        compile_pool.close_compile_pool()
    assert seconds > 0 and compile_pool.is_cached(job, kernel)
    folders = _cubin_folders(cache)
    assert len(folders) == 1

    src = ASTSource(kernel, job.signature, job.constants, job.attrs)
    triton.compile(src, target=job.target, options=dict(job.options))
    assert _cubin_folders(cache) == folders  # a cache hit: the worker's key is the launch's


def test_workers_do_not_run_the_users_main_script_again(tmp_path):
    """A user's script without an `if __name__ == "__main__":` guard starts an engine whose first start compiles
    in processes: its top level runs once (multiprocessing's forkserver ran it again in every worker, each starting
    an engine of its own). A worker's failure comes back as the job's error; the script then exits cleanly."""
    import subprocess
    import sys

    script = tmp_path / "user_script.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "print('top level ran', flush=True)\n"
        "from engine import compile_pool\n"
        "job = compile_pool.CompileJob('engine.layers.fp8', 'no_such_kernel', {}, {}, {}, {}, None, '.', ())\n"
        "futures = [compile_pool._executor(2).submit(job) for _ in range(3)]\n"
        "errors = [f.exception(timeout=300) for f in futures]\n"
        "compile_pool.close_compile_pool()\n"
        "print('errors:', *sorted({type(e).__name__ + ' ' + str(e).split(':')[0] for e in errors}), flush=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("top level ran") == 1, done.stdout
    assert "errors: RuntimeError AttributeError" in done.stdout, done.stdout + done.stderr[-3000:]


def test_a_server_that_dies_fails_its_jobs_instead_of_hanging(monkeypatch):
    """The server killed while it still imports: the job sent before fails with the reason (its launch then
    compiles it in-process), a later submit raises at once, and closing returns."""
    import signal
    import time

    monkeypatch.setenv("NANOVLLM_COMPILE_PROCESSES", "2")
    server = compile_pool._executor(2)
    try:
        job = compile_pool.CompileJob("engine.layers.fp8", "no_such_kernel", {}, {}, {}, {}, None, ".", ())
        pending = server.submit(job)
        os.killpg(server._proc.pid, signal.SIGKILL)  # long before its imports of torch and Triton are done
        assert "stopped before this job's result" in str(pending.exception(timeout=60))
        deadline = time.monotonic() + 60
        while server._reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="has stopped"):
            server.submit(job)
    finally:
        compile_pool.close_compile_pool()
    assert compile_pool._pool is None


def test_processes_are_a_switch_with_a_checked_value(monkeypatch):
    """NANOVLLM_COMPILE_PROCESSES=0 keeps compiles in-process without noting anything; a bad value names itself."""
    monkeypatch.setenv("NANOVLLM_COMPILE_PROCESSES", "0")
    ran = []
    assert compile_pool.compile_ahead([lambda: ran.append(1)] * 3, lambda call: call()) == 0
    assert ran == []  # nothing was run to note compiles
    assert compile_pool.prestart_compile_pool() is None

    monkeypatch.setenv("NANOVLLM_COMPILE_PROCESSES", "4")
    assert compile_pool._workers() == 4
    monkeypatch.setattr("sys.executable", "")  # an embedding application: no interpreter to start the server with
    assert compile_pool._workers() == 0 and compile_pool.prestart_compile_pool() is None

    monkeypatch.setenv("NANOVLLM_COMPILE_PROCESSES", "many")
    with pytest.raises(ValueError, match="NANOVLLM_COMPILE_PROCESSES='many'"):
        compile_pool.compile_processes()


def test_a_kernel_that_is_no_factory_product_is_refused():
    """A worker rebuilds only what the engine's modules define: a wrong name is a LookupError naming it, which the
    caller leaves to the in-process launch."""
    with pytest.raises(LookupError, match="engine.layers.fp8:_build_quantize_kernel.<locals>.other"):
        compile_pool._kernel("engine.layers.fp8", "_build_quantize_kernel.<locals>.other")


def test_a_factory_of_several_kernels_gives_each_by_name():
    from engine.layers.sample import _build_kernels

    bin_kernel = compile_pool._kernel("engine.layers.sample", "_build_kernels.<locals>.bin_kernel")
    assert bin_kernel.fn.__qualname__ == "_build_kernels.<locals>.bin_kernel"
    assert bin_kernel.fn.__name__ in {k.fn.__name__ for k in _build_kernels()}
    with pytest.raises(LookupError, match="_build_kernels.<locals>.other"):
        compile_pool._kernel("engine.layers.sample", "_build_kernels.<locals>.other")


def test_noting_skips_only_the_noting_threads_compiles(monkeypatch):
    """While the calls run, Triton's compile hook notes each distinct compile once and skips it (True), but lets
    another thread's launch compile (None: another engine may be serving); afterwards the hook is as it was."""
    import threading
    import types

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from engine.layers.fp8 import _build_quantize_kernel

    target = GPUTarget("cuda", 90, 32)
    # No GPU here: a stand-in driver answers the target (setting and resetting the active one would build the real).
    monkeypatch.setattr(driver, "_active", types.SimpleNamespace(get_current_target=lambda: target))
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    kernel = _build_quantize_kernel()
    info = types.SimpleNamespace(module=kernel.fn.__module__, name=kernel.fn.__qualname__, jit_function=kernel)

    def launch(key):  # what a launch that misses Triton's in-memory cache does: ask the hook whether to compile
        spec = json.dumps({"options": {"num_warps": 4, "supported_fp8_dtypes": ["fp8e4nv"]}})
        compile = {"signature": {"K": "i32"}, "constants": {(9,): key}, "configs": [{}], "specialization_data": spec}
        return knobs.runtime.jit_cache_hook(key=key, repr="", fn=info, compile=compile, is_manual_warmup=False)

    answers, elsewhere = [], []

    def from_another_thread():
        thread = threading.Thread(target=lambda: elsewhere.append(launch(9)))
        thread.start()
        thread.join()

    calls = [lambda: answers.append(launch(1)), lambda: answers.append(launch(2)), lambda: answers.append(launch(1))]
    noted = compile_pool.record_compiles([*calls, from_another_thread], lambda call: call())
    assert answers == [True, True, True] and elsewhere == [None]
    assert [job.constants for job, _ in noted] == [{(9,): 1}, {(9,): 2}]  # one job per distinct compile
    job, rebuilt = noted[0]
    assert rebuilt is kernel and job.target == target and job.qualname == kernel.fn.__qualname__
    assert job.options == {"num_warps": 4, "supported_fp8_dtypes": ("fp8e4nv",)}  # JSON's lists are tuples again
    assert knobs.runtime.jit_cache_hook is None


def test_a_worker_takes_the_engines_kernel_environment(monkeypatch):
    """Workers fork from a server with the environment it started with, maybe another engine's: a job carries the
    engine's NANOVLLM_ and TRITON_ variables, and the worker takes exactly those before it builds the kernel."""
    monkeypatch.setattr(os, "environ", dict(os.environ))  # this test's changes stay in this test
    os.environ.update(NANOVLLM_PDL="0", TRITON_DEBUG="1", HOME_OF_THE_TEST="kept")
    theirs = compile_pool.kernel_environ()
    assert ("NANOVLLM_PDL", "0") in theirs and ("TRITON_DEBUG", "1") in theirs
    assert all(name.startswith(("NANOVLLM_", "TRITON_")) for name, _ in theirs)

    os.environ.update(NANOVLLM_PDL="1", NANOVLLM_GEMV="force")
    del os.environ["TRITON_DEBUG"]
    compile_pool._take_environ(theirs)
    assert os.environ["NANOVLLM_PDL"] == "0" and os.environ["TRITON_DEBUG"] == "1"
    assert "NANOVLLM_GEMV" not in os.environ and os.environ["HOME_OF_THE_TEST"] == "kept"


def test_the_processes_stop_when_a_start_up_fails(monkeypatch):
    """Processes a start-up started stop when compile_processes_while is left, also when the start-up raises (a
    failed LLM() leaves no idle processes behind)."""
    seen = []
    monkeypatch.setattr(compile_pool, "prestart_compile_pool", lambda: seen.append("start"))
    monkeypatch.setattr(compile_pool, "close_compile_pool", lambda: seen.append("close"))
    with pytest.raises(RuntimeError, match="out of memory"):
        with compile_pool.compile_processes_while():
            compile_pool.prestart_compile_pool()
            seen.append("start-up")
            raise RuntimeError("out of memory")
    assert seen == ["start", "start-up", "close"]
    seen.clear()
    with compile_pool.compile_processes_while():  # started by the start-up once it knows it will time
        seen.append("load")
        compile_pool.prestart_compile_pool()
        seen.append("timings")
        compile_pool.close_compile_pool()
        seen.append("engine")
    assert seen == ["load", "start", "timings", "close", "engine", "close"]  # the second close finds none: a no-op
