"""The server of the Triton compile processes (engine/compile_pool.py), run as its own interpreter:
`python -P -m engine.compile_server JOBS_FD RESULTS_FD WORKERS`.

It imports what each worker would otherwise load for itself (torch, Triton's compiler, the engine's kernel modules,
Triton's hash of its own source) once, then forks its workers from itself: a fresh process with no CUDA state and
no threads, so forking is safe there. Unlike multiprocessing's spawn and forkserver methods, nothing here runs the
user's main script again (a script without an `if __name__ == "__main__":` guard would start an engine in every
worker). Jobs arrive pickled on JOBS_FD as (id, CompileJob); each result goes back on RESULTS_FD as (id, ok,
seconds or the error's text). The server ends when JOBS_FD does (the engine closed it, or exited).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor


def _preload() -> None:
    # Loaded once here, before the workers fork, so that each starts with them.
    import triton.compiler  # noqa: F401

    import engine.attention.triton_decode  # noqa: F401
    import engine.layers.fp8  # noqa: F401
    import engine.layers.fused_qkv  # noqa: F401
    import engine.layers.gemv  # noqa: F401
    import engine.layers.sample  # noqa: F401

    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # a Triton that keeps it elsewhere: each worker computes it
        return
    triton_key()  # ~0.35 s of hashing, cached per process


def _close_pipes(*fds: int) -> None:
    # A worker holds no copy of the server's pipes: the engine then sees the results pipe end when the server does.
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def serve(jobs_fd: int, results_fd: int, workers: int) -> None:
    """Compile the jobs read from jobs_fd in `workers` forked processes, writing each result to results_fd, until
    jobs_fd ends; jobs not started by then are dropped, running ones finish."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's process's to handle; its exit ends the pipe
    _preload()
    from engine.compile_pool import compile_job

    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_close_pipes,
        initargs=(jobs_fd, results_fd),
    )
    results = os.fdopen(results_fd, "wb")
    write = threading.Lock()

    def reply(ident: int, ok: bool, value) -> None:
        with write, contextlib.suppress(OSError):
            pickle.dump((ident, ok, value), results)
            results.flush()

    def done(ident: int, future: Future) -> None:
        try:
            reply(ident, True, future.result())
        except BaseException as err:  # noqa: BLE001 - any failure goes back: the engine's launch compiles the kernel
            reply(ident, False, f"{type(err).__name__}: {err}")

    with os.fdopen(jobs_fd, "rb") as jobs:
        while True:
            try:
                ident, job = pickle.load(jobs)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            try:
                pool.submit(compile_job, job).add_done_callback(functools.partial(done, ident))
            except RuntimeError as err:  # a broken pool (a worker died): this job fails, the engine compiles it
                reply(ident, False, f"{type(err).__name__}: {err}")
    pool.shutdown(wait=True, cancel_futures=True)
    with contextlib.suppress(OSError):
        results.close()


def main(argv: list[str] | None = None) -> None:
    """The server's entry point: JOBS_FD RESULTS_FD WORKERS."""
    jobs_fd, results_fd, workers = (int(arg) for arg in (sys.argv[1:] if argv is None else argv))
    serve(jobs_fd, results_fd, workers)


if __name__ == "__main__":
    main()
