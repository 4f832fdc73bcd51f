"""Where a whole engine process's time goes, as a user's script pays it: imports, LLM(), first request, shutdown,
and the process's exit. Printed only (the thirty-sixth session's runs 1-3; docs/benchmarks.md, section 10).

Usage (on the GPU host, after `source .gpu-kit/setup.sh`; TRITON_CACHE_DIR and NANOVLLM_TUNE_CACHE as a start should
find them: empty for a first start):
    python benchmarks/process_profile.py [--rounds N] [--real] [--flashinfer-first] [--cuda-first] [--cprofile]
        [--empty-cache]
--real writes random Qwen3-0.6B weights as a safetensors checkpoint and loads them instead of random ones.

The child (--child) is deliberately a script without an `if __name__ == "__main__":` guard, as many users' scripts
are: anything that runs the main script again in another process (multiprocessing's spawn or forkserver) shows here.
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the engine, from this checkout
OPTIONS = ("--real", "--flashinfer-first", "--cuda-first", "--cprofile", "--empty-cache")

if "--child" in sys.argv:
    T = [("start", time.time())]

    def mark(name):
        T.append((name, time.time()))

    import torch

    mark("import torch")
    import triton  # noqa: F401

    mark("import triton")
    import transformers  # noqa: F401

    mark("import transformers")
    if "--flashinfer-first" in sys.argv:
        import flashinfer  # noqa: F401

        mark("import flashinfer")
    from engine import LLM, SamplingParams

    mark("import engine")
    import langchain_nanovllm  # noqa: F401

    mark("import langchain_nanovllm")
    from pathlib import Path

    folder = Path(sys.argv[sys.argv.index("--folder") + 1])
    kw = {} if "--real" in sys.argv else {"load_format": "dummy"}
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if "--cuda-first" in sys.argv:
        torch.zeros(1, device="cuda")
        mark("cuda init")
    if "--cprofile" in sys.argv:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
    llm = LLM(folder, **kw)
    mark("LLM()")
    if "--cprofile" in sys.argv:
        prof.disable()
        with open(os.path.join(os.environ.get("OUT", "/tmp"), "cprofile.txt"), "w") as f:
            st = pstats.Stats(prof, stream=f)
            st.sort_stats("cumulative").print_stats(70)
            st.sort_stats("tottime").print_stats(30)
    out = llm.generate([list(range(100, 228))], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    mark("first request")
    phases = llm.startup_seconds
    llm.shutdown()
    mark("shutdown")
    del llm
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    mark("del")
    if "--empty-cache" in sys.argv:
        torch.cuda.empty_cache()
        mark("empty_cache")
    print(json.dumps({"marks": T, "phases": phases, "fi_loaded": "flashinfer" in sys.modules}), flush=True)
    sys.exit(0)


def make_folder(real: bool):
    """A Qwen3-0.6B folder (config, stand-in tokenizer), with random weights as a safetensors file where `real`."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tempfile
    from pathlib import Path

    from common import model_folder

    root = Path(tempfile.mkdtemp(prefix="pp-"))
    folder = model_folder("Qwen3-0.6B", root)
    if real:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        g = torch.Generator(device="cuda").manual_seed(0)
        tensors = {}
        for name, p in m.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            t = torch.empty(p.shape, dtype=torch.bfloat16, device="cuda")
            if "norm" in name:
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02, generator=g)
            tensors[name] = t.cpu()
        t0 = time.time()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        print(f"wrote {sum(t.numel() * 2 for t in tensors.values()) / 2**30:.2f} GiB in {time.time() - t0:.1f}s")
    return folder


if __name__ == "__main__":
    real = "--real" in sys.argv
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    extra = [
        a for a in sys.argv[1:] if a in ("--real", "--flashinfer-first", "--cuda-first", "--cprofile", "--empty-cache")
    ]
    folder = make_folder(real)
    for r in range(rounds):
        t0 = time.time()
        p = subprocess.run(
            [sys.executable, __file__, "--child", "--folder", str(folder), *extra],
            capture_output=True,
            text=True,
        )
        t_end = time.time()
        if p.returncode:
            print(p.stdout[-3000:], p.stderr[-3000:])
            raise SystemExit(1)
        res = json.loads(p.stdout.strip().splitlines()[-1])
        marks = res["marks"]
        prev = t0
        row = []
        for name, t in marks:
            row.append(f"{name} {t - prev:.2f}")
            prev = t
        row.append(f"exit {t_end - prev:.2f}")
        ph = {k: round(v, 2) for k, v in res["phases"].items()}
        print(f"round {r} {' '.join(extra)} total {t_end - t0:.2f}s | " + " | ".join(row) + f" | phases {ph}")
        for line in p.stderr.splitlines():
            if line.startswith("engine") and any(w in line for w in ("ready in", "compiled", "loaded", "timed")):
                print("   ", line[:300])
