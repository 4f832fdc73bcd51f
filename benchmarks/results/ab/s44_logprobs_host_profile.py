"""Host profile of batch-1 decode with and without logprobs (step timing, then cProfile of the engine thread)."""

import os
import pathlib
import pstats
import sys
import tempfile
import time

sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from common import model_folder  # noqa: E402
from gpu_bench import print_step_timing, profile_engine_thread  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402

os.environ["NANOVLLM_STEP_TIMING"] = "1"
folder = model_folder("Qwen3-0.6B", pathlib.Path(tempfile.mkdtemp()))
for lp, prof_on in ((None, False), (1, False), (1, True)):
    llm = LLM(folder, load_format="dummy", max_model_len=4096, max_num_seqs=8)
    prof = profile_engine_thread(llm) if prof_on else None
    p = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True, logprobs=lp)
    llm.generate([[5] * 128], p)
    llm.engine.step_timing.clear() if llm.engine.step_timing else None
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        o = llm.generate([[5] * 128], p)[0]
        rates.append(255 / (o.finish_time - o.first_token_time))
    print(f"logprobs={lp} profiled={prof_on}: tok/s {[round(r, 1) for r in rates]}", flush=True)
    print_step_timing(llm, f"lp{lp}")
    llm.shutdown()
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
