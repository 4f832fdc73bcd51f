"""Helpers shared by the benchmark scripts: model shapes, result files, timing."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def qwen3_config(name: str):
    """Real Qwen3 shapes (from the published configs)."""
    from transformers import Qwen3Config

    shapes = {
        "Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, tie_word_embeddings=True),
        "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False),
    }[name]  # fmt: skip
    return Qwen3Config(
        vocab_size=151936, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
        eos_token_id=151645, bos_token_id=151643, architectures=["Qwen3ForCausalLM"], **shapes,
    )  # fmt: skip


def llama_config(name: str):
    """Real Llama shapes (from the published configs; rope without Llama 3's long-context scaling, which changes
    no kernel's shape)."""
    from transformers import LlamaConfig

    shapes = {
        "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=64),
    }[name]  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001, architectures=["LlamaForCausalLM"],
        **shapes,
    )  # fmt: skip


def model_config(name: str):
    """The config of a benchmark model by name: Qwen3-0.6B, Qwen3-8B or Llama-3.2-1B (head_dim 64)."""
    return llama_config(name) if name.startswith("Llama") else qwen3_config(name)


def model_folder(name: str, root: Path) -> Path:
    """A folder with the config and a stand-in tokenizer; weights come from load_format='dummy'."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from helpers import tiny_tokenizer

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    model_config(name).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def git_commit() -> str:
    """The checked-out commit ($NANOVLLM_COMMIT where the tree travels without .git), or 'unknown'."""
    import os

    if os.environ.get("NANOVLLM_COMMIT"):
        return os.environ["NANOVLLM_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def device_name() -> str:
    """The GPU's name, or the CPU's when there is none."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores"


def command_line() -> str:
    """The command that ran, with the engine's NANOVLLM_* settings in front (they change what is measured)."""
    import os

    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NANOVLLM_") and k != "NANOVLLM_COMMIT"]
    return " ".join(env + ["python"] + sys.argv)


def write_result(name: str, results: dict, out_dir: Path | None = None) -> Path:
    """Write benchmarks/results/<name>.json (and a copy under out_dir) with device, date, commit and command."""
    payload = {
        "device": device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": command_line(),
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
    return path


def print_table(title: str, rows: list[dict]) -> None:
    """Print rows of dicts as an aligned table."""
    if not rows:
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    print(f"\n{title}")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(widths[c]) for c in cols))


def fmt(v) -> str:
    """Compact number formatting for tables."""
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)
