"""Errors a user can cause: raised at the call, naming the bad value, while the engine keeps serving."""

from __future__ import annotations

import pytest

from engine import LLM, ModelLoadError, RequestFailedError, SamplingParams

OK = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def still_serves(llm) -> None:
    out = llm.generate([[5, 6, 7]], OK)[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_prompt_longer_than_max_model_len_names_both_lengths(qwen3_llm):
    n = qwen3_llm.max_model_len
    with pytest.raises(ValueError, match=rf"{n + 5} tokens.*max_model_len is {n}"):
        qwen3_llm.generate([[5] * (n + 5)], OK)
    still_serves(qwen3_llm)


def test_empty_prompts_are_rejected(qwen3_llm):
    with pytest.raises(ValueError, match="empty"):
        qwen3_llm.generate([[]], OK)
    with pytest.raises(ValueError, match="empty"):
        qwen3_llm.generate("", OK)
    with pytest.raises(ValueError, match="messages is empty"):
        qwen3_llm.chat([], OK)
    still_serves(qwen3_llm)


def test_token_ids_outside_the_vocabulary_are_named(qwen3_llm):
    with pytest.raises(ValueError, match=r"\[99999\].*vocabulary \[0, 512\)"):
        qwen3_llm.generate([[5, 99999]], OK)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        qwen3_llm.generate([[-1, 5]], OK)
    with pytest.raises(TypeError, match=r"integers; got 6.0 of type float"):
        qwen3_llm.generate([[5, 6.0]], OK)
    with pytest.raises(TypeError, match=r"got '7' of type str"):
        qwen3_llm.generate([[5, "7"]], OK)
    still_serves(qwen3_llm)


def test_one_bad_prompt_in_a_batch_queues_nothing(qwen3_llm):
    before = qwen3_llm.stats()["num_steps"]
    with pytest.raises(ValueError):
        qwen3_llm.generate([[5, 6], [5, 70000]], OK)
    assert qwen3_llm.stats()["num_steps"] == before
    still_serves(qwen3_llm)


def test_unknown_engine_option_is_named(qwen3_path):
    with pytest.raises(TypeError, match="max_num_seq'"):
        LLM(qwen3_path, device="cpu", max_num_seq=4)


def test_invalid_engine_value_is_named(qwen3_path):
    with pytest.raises(ValueError, match="block_size"):
        LLM(qwen3_path, device="cpu", block_size=0)


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist"), device="cpu")


def test_folder_without_weights(tmp_path, qwen3_path):
    import shutil

    shutil.copy(qwen3_path / "config.json", tmp_path / "config.json")
    for f in qwen3_path.glob("tokenizer*"):
        shutil.copy(f, tmp_path / f.name)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        LLM(tmp_path, device="cpu")


def test_truncated_safetensors(tmp_path, qwen3_path):
    import shutil

    for f in qwen3_path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        LLM(tmp_path, device="cpu")


def test_unsupported_architecture_lists_supported(tmp_path, qwen3_path):
    import json
    import shutil

    for f in qwen3_path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*Qwen3ForCausalLM"):
        LLM(tmp_path, device="cpu")


def test_flashinfer_backend_on_cpu_says_what_to_do(qwen3_path):
    with pytest.raises(ValueError, match="attention_backend='torch'"):
        LLM(qwen3_path, device="cpu", attention_backend="flashinfer")


def test_failed_step_fails_its_requests_and_the_engine_goes_on(qwen3_llm):
    engine = qwen3_llm.engine
    calls = {"n": 0}

    def boom(out):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")

    engine.fault_injector = boom
    try:
        with pytest.raises(RequestFailedError, match="injected fault"):
            qwen3_llm.generate([[5, 6, 7]], OK)
    finally:
        engine.fault_injector = None
    assert qwen3_llm.stats()["kv_blocks_used"] == 0
    still_serves(qwen3_llm)


def test_corrupt_gguf_is_a_load_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="broken"):
        LLM(bad, device="cpu")
