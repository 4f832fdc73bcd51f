"""Where one engine start-up's time goes: start Qwen3-0.6B (random weights) once in this process and print
`LLM.startup_seconds`, whether Python writes bytecode, and how many imported modules had none cached; with `prof`,
under cProfile, with the top functions by cumulative and by own time. It keeps the Triton cache and the kept
start-up choices (TRITON_CACHE_DIR, NANOVLLM_TUNE_CACHE) of its environment, so a first call is a cold start and
later calls are later starts.

Usage (on the GPU host, after `source .gpu-kit/setup.sh`; the thirty-fourth session's runs 1-4 and 7):
    TRITON_CACHE_DIR=/tmp/tc NANOVLLM_TUNE_CACHE=/tmp/tune python benchmarks/startup_profile.py plain
    ... python benchmarks/startup_profile.py prof      # the same start under cProfile ($OUT/warm.prof when set)
Set PYTHONPYCACHEPREFIX and unset PYTHONDONTWRITEBYTECODE to start as an installed environment does.
"""

from __future__ import annotations

import collections
import cProfile
import importlib.util
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from common import model_folder  # noqa: E402


def main() -> None:
    """Start the engine once (mode `plain` or `prof`) and print where its time went."""
    mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
    if mode not in ("plain", "prof"):
        raise SystemExit(f"mode {mode!r}: use 'plain' or 'prof'")
    start = time.perf_counter()
    from engine import LLM

    print("import engine", round(time.perf_counter() - start, 2))
    folder = model_folder("Qwen3-0.6B", Path(tempfile.mkdtemp()))
    prof = cProfile.Profile() if mode == "prof" else None
    if prof:
        prof.enable()
    llm = LLM(folder, load_format="dummy")
    if prof:
        prof.disable()
    print({k: round(v, 2) for k, v in llm.startup_seconds.items()})
    llm.shutdown()
    # Modules imported without cached bytecode were compiled from source in this process.
    missing = collections.Counter()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.endswith(".py") and not os.path.exists(importlib.util.cache_from_source(path)):
            missing[os.path.dirname(path)[:60]] += 1
    no_pyc = sum(missing.values())
    print("dont_write_bytecode", sys.dont_write_bytecode, "prefix", sys.pycache_prefix, "no pyc:", no_pyc)
    print(missing.most_common(15))
    if prof:
        if os.environ.get("OUT"):
            prof.dump_stats(os.path.join(os.environ["OUT"], "warm.prof"))
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(70)
        stats.sort_stats("tottime").print_stats(40)


if __name__ == "__main__":
    main()
