"""Triton compiles of a first start in separate processes.

Why: on an empty Triton cache the start-up timings' candidates and the split-KV decode configurations compile on
their first launch. Threads overlap only the compiler's native part: Triton's front end is Python and holds the GIL
(docs/benchmarks.md, section 10). Here those launches are first run with Triton's compiles skipped and noted
(`knobs.runtime.jit_cache_hook`); the kernels not yet in Triton's disk cache compile in worker processes forked from
a server that has the engine's kernel modules imported (engine/compile_server.py, its own interpreter: multiprocessing's
spawn and forkserver would run the user's main script again in each worker); the launches then run as before and
load them from the cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("engine")

_lock = threading.Lock()
_pool: CompileServer | None = None


@dataclass(frozen=True)
class CompileJob:
    """One kernel compile as Triton's launch would run it: the kernel by module and qualified name, and the
    arguments of `triton.compile` (an ASTSource's signature, constants and attributes; options; target)."""

    module: str
    qualname: str
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    target: object
    cache_dir: str
    environ: tuple[tuple[str, str], ...] = ()


def compile_processes() -> int:
    """NANOVLLM_COMPILE_PROCESSES: how many processes compile the Triton kernels a start-up launches side by side
    that are not in Triton's cache yet (default: the CPU count, at most 16; 0 or 1: in the engine's process, on
    threads, as before)."""
    from engine.config import env_whole_number

    return env_whole_number("NANOVLLM_COMPILE_PROCESSES", min(16, os.cpu_count() or 1), "processes")


def _workers() -> int:
    # How many compile processes to use: 0 where they are off, this platform cannot fork (the server forks them) or
    # this Python cannot name its own interpreter to start the server with (an embedding application).
    workers = compile_processes()
    return workers if workers > 1 and sys.executable and "fork" in multiprocessing.get_all_start_methods() else 0


def _tuples(value):
    # JSON turned Triton's tuples into lists; its options hold no lists, and their hash spells tuples as tuples.
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def record_compiles(calls: list[Callable[[], object]], run: Callable) -> list[tuple[CompileJob, object]]:
    """Run each call through run() on this thread with Triton's compiles skipped (its launches that would compile
    return without launching); returns (job, kernel) for each distinct compile they would have run."""
    from triton import knobs
    from triton.runtime.driver import driver

    target = driver.active.get_current_target()
    cache_dir, environ = knobs.cache.dir, kernel_environ()
    noted: dict[tuple, tuple[CompileJob, object]] = {}
    recorder = threading.get_ident()

    def hook(*, key, fn, compile, **_):
        if threading.get_ident() != recorder:
            return None  # another thread's launch (another engine serving): compiled and launched as always
        options = _tuples(json.loads(compile["specialization_data"])["options"])
        job = CompileJob(
            fn.module, fn.name, compile["signature"], compile["constants"], compile["configs"][0], options, target,
            cache_dir, environ,
        )  # fmt: skip
        noted.setdefault((fn.module, fn.name, repr(key)), (job, fn.jit_function))
        return True  # skip the compile: the launch returns None

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        for call in calls:
            run(call)
    finally:
        knobs.runtime.jit_cache_hook = previous
    return list(noted.values())


def is_cached(job: CompileJob, kernel) -> bool:
    """Whether Triton's disk cache already holds this compile: the key and file triton.compile would look up."""
    from triton.compiler import ASTSource
    from triton.compiler.compiler import get_cache_invalidating_env_vars, make_backend
    from triton.runtime.cache import get_cache_key, get_cache_manager

    src = ASTSource(kernel, job.signature, job.constants, job.attrs)
    backend = make_backend(job.target)
    options = backend.parse_options(dict(job.options, **src.parse_options()))
    key = get_cache_key(src, backend, options, get_cache_invalidating_env_vars())
    group = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest()).get_group(f"{src.name[:150]}.json")
    return group is not None


# The environment variables that can shape a kernel's source or Triton's compile: a worker takes the engine
# process's values, since the server forked its workers with its own (from when it started, maybe another engine's).
ENVIRON_PREFIXES = ("NANOVLLM_", "TRITON_")


def kernel_environ() -> tuple[tuple[str, str], ...]:
    """This process's environment variables that can shape the engine's kernels or Triton's compiles."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENVIRON_PREFIXES)))


def _take_environ(environ: tuple[tuple[str, str], ...]) -> None:
    for name in [k for k in os.environ if k.startswith(ENVIRON_PREFIXES)]:
        del os.environ[name]
    os.environ.update(environ)


def _qualname(kernel) -> str | None:
    return getattr(getattr(kernel, "fn", None), "__qualname__", None)


@functools.cache
def _kernel(module: str, qualname: str, environ: tuple[tuple[str, str], ...] = ()):
    # A kernel defined in a zero-argument factory (`_build_kernel.<locals>.name`) comes from calling the factory,
    # afresh for each environment: its module's switches are read as it builds. A factory may build several
    # kernels (a tuple of them).
    owner, _, inner = qualname.partition(".<locals>.")
    kernel = getattr(importlib.import_module(module), owner)
    if inner:
        if hasattr(kernel, "cache_clear"):
            kernel.cache_clear()
        kernel = kernel()
        if isinstance(kernel, tuple):
            kernel = next((k for k in kernel if _qualname(k) == qualname), None)
    if _qualname(kernel) != qualname:
        raise LookupError(f"{module}:{qualname} is not a Triton kernel this process can rebuild")
    return kernel


def compile_job(job: CompileJob) -> float:
    """Compile one job into Triton's disk cache (in a worker); returns the seconds it took."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    start = time.perf_counter()
    _take_environ(job.environ)
    knobs.cache.dir = job.cache_dir
    src = ASTSource(_kernel(job.module, job.qualname, job.environ), job.signature, job.constants, job.attrs)
    compiled = triton.compile(src, target=job.target, options=job.options)
    _build_launcher(src, compiled)
    return time.perf_counter() - start


def _build_launcher(src, compiled) -> None:
    # Tritons that build a C launcher per kernel signature and constants (3.6) compile it with the host's C compiler
    # on the kernel's first launch; built here, the launch loads it from the cache. Later Tritons launch through one
    # generic launcher, which needs the CUDA driver: nothing to build ahead there.
    from triton.backends.nvidia import driver as nvidia_driver

    if hasattr(nvidia_driver, "make_launcher"):
        try:
            nvidia_driver.CudaLauncher(src, compiled.metadata)
        except Exception:  # noqa: BLE001 - the launch builds it, or raises its own error
            logger.debug("a Triton launcher could not be built ahead", exc_info=True)


class CompileServer:
    """The compile processes as the engine sees them: a server interpreter (engine/compile_server.py) that forks its
    workers from itself. submit() sends a job over one pipe; a reader thread resolves its future from the other."""

    def __init__(self, workers: int):
        jobs_r, jobs_w = os.pipe()
        results_r, results_w = os.pipe()
        # The server imports the engine from where this process did, whatever the user's working directory holds
        # (-P: it is not put on the path).
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "engine.compile_server", str(jobs_r), str(results_w), str(workers)],
                pass_fds=(jobs_r, results_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a group of its own with its workers: shutdown() can stop them all
            )
        except BaseException:
            for fd in (jobs_w, results_r):
                os.close(fd)
            raise
        finally:
            for fd in (jobs_r, results_w):  # the server's ends: with them closed here, each side sees the other end
                os.close(fd)
        self._jobs = os.fdopen(jobs_w, "wb")
        self._write = threading.Lock()
        self._lock = threading.Lock()
        self._futures: dict[int, Future] = {}
        self._next = 0
        self._ended = False
        self._reader = threading.Thread(
            target=self._read, args=(results_r,), name="nanovllm-compile-results", daemon=True
        )
        self._reader.start()

    def submit(self, job: CompileJob) -> Future:
        """Send one job; its future gets the compile's seconds, or a RuntimeError with the worker's error."""
        future: Future = Future()
        with self._lock:
            if self._ended:
                raise RuntimeError("the Triton compile server has stopped")
            ident, self._next = self._next, self._next + 1
            self._futures[ident] = future
        try:
            with self._write:
                pickle.dump((ident, job), self._jobs)
                self._jobs.flush()
        except (OSError, ValueError):  # the server is gone (or shut down): the caller compiles in-process
            with self._lock:
                self._futures.pop(ident, None)
            raise
        return future

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as results:
            while True:
                try:
                    ident, ok, value = pickle.load(results)
                except (EOFError, OSError, pickle.UnpicklingError):
                    break
                with self._lock:
                    future = self._futures.pop(ident, None)
                if future is not None:
                    future.set_result(value) if ok else future.set_exception(RuntimeError(value))
        with self._lock:
            self._ended = True
            left, self._futures = list(self._futures.values()), {}
        for future in left:
            future.set_exception(RuntimeError("the Triton compile server stopped before this job's result"))

    def shutdown(self) -> None:
        """End the job pipe and wait for the server: jobs not started are dropped, running compiles finish."""
        with self._write, contextlib.suppress(OSError):
            self._jobs.close()
        try:
            self._proc.wait(timeout=120)
        except subprocess.TimeoutExpired:  # a hung compile: its worker would outlive a server killed alone
            with contextlib.suppress(OSError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._reader.join(timeout=10)


def _executor(workers: int) -> CompileServer:
    global _pool
    with _lock:
        if _pool is None:
            _pool = CompileServer(workers)
        return _pool


def prestart_compile_pool() -> CompileServer | None:
    """Start the compile processes where a start-up is about to compile (its timings have no record): their
    server's imports (~2.5 s, which its first jobs wait for) then overlap what the start-up does first (the load).
    None where processes are off or the server could not start (the compiles then run in-process)."""
    workers = _workers()
    if not workers:
        return None
    try:
        return _executor(workers)
    except (OSError, subprocess.SubprocessError):
        logger.debug("could not start the Triton compile processes", exc_info=True)
        return None


def close_compile_pool() -> None:
    """Stop the compile processes, if any: a start-up's compiles are over."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown()


@contextlib.contextmanager
def compile_processes_while() -> Iterator[None]:
    """Within it, a start-up may start the compile processes (prestart_compile_pool) once it knows it will compile;
    they stop on exit, also when the start-up fails (close_compile_pool is a no-op where none run)."""
    try:
        yield
    finally:
        close_compile_pool()


def compile_ahead(calls: list[Callable[[], object]], run: Callable) -> int:
    """Compile, in separate processes, the Triton kernels that the calls would compile on their first launch and
    that are not in Triton's disk cache; returns how many were compiled there. Fewer than two such kernels, processes
    off (`compile_processes()` 0 or 1) or a Triton without the hook: 0, and the calls compile in-process as before.
    A compile that fails in a worker is left to the launch, which compiles it (or raises) as it would have anyway."""
    workers = _workers()
    if not workers or len(calls) < 2:
        return 0
    start = time.perf_counter()
    try:
        missing = [job for job, kernel in record_compiles(calls, run) if not is_cached(job, kernel)]
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):  # a Triton whose hook or cache differs
        logger.debug("Triton compiles could not be noted ahead; they run in-process", exc_info=True)
        return 0
    if len(missing) < 2:
        return 0
    try:
        pool = _executor(workers)
        futures = [pool.submit(job) for job in missing]
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError):
        logger.debug("could not start the Triton compile processes", exc_info=True)
        return 0
    compiled = 0
    for future in futures:
        try:
            future.result()
            compiled += 1
        except Exception:  # noqa: BLE001 - the launch compiles it again, or raises its own error
            logger.debug("a Triton compile failed in a worker; the launch compiles it", exc_info=True)
    logger.info(
        "Triton: %d kernels not in its cache compiled in %d processes in %.1fs",
        compiled,
        min(workers, len(missing)),
        time.perf_counter() - start,
    )
    return compiled
