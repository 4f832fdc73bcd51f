"""The start-up timings' choices kept on disk (engine/tune_cache.py): what a record holds, when it is read, and that
a record which does not fit changes nothing. The GPU test (tests/gpu/test_gpu_parity.py) starts engines from it."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import tiny_config
from torch import nn

from engine.models.registry import model_class_for
from engine.tune_cache import apply_tuned_state, load_record, record_path, save_record, tuned_state


def make_net(**overrides) -> nn.Module:
    cfg = tiny_config("qwen3", **overrides)
    torch.manual_seed(0)
    return model_class_for(cfg)(cfg, max_positions=256, fused=False)


def tune_by_hand(net: nn.Module) -> None:
    """Choices as the timings leave them: a column-major weight, one-row and few-row plans, FP8 tiles."""
    o = net.layers[1].self_attn.o_proj
    o.weight.data = o.weight.data.t().contiguous().t()
    for layer in net.layers:
        layer.gemv_plan = {"qkv": (4, 512, 4, True), "o": None, "gate_up": (2, 512, 2, True), "down": None}
        layer.rows_plan = {16: {"qkv": (64, 256, 4, 2, 4), "o": None}, 32: {"qkv": None, "o": None}}
        layer.rows_max = 24
    down = net.layers[0].mlp.down_proj
    down.fp8_configs, down.fp8_act_configs = {1: (1, 2, 3, False), 16: (4, 5, 6, 7, 8)}, {64: None, 128: (1, 2)}
    net.layers[1].mlp.down_proj.fp8_configs = {1: (1, 2, 3, True)}  # no FP8-activation choices: None, not {}


def test_a_kept_record_makes_a_fresh_model_as_the_timings_left_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_TUNE_CACHE", str(tmp_path))
    net = make_net()
    tune_by_hand(net)
    path = record_path(net, torch.device("cpu"), block_size=64)
    save_record(path, net)
    assert path.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left

    fresh = make_net()
    assert tuned_state(fresh) != tuned_state(net)
    fresh.gemv_alternatives = {"qkv": [(1, 2, 3, True)]}
    assert load_record(record_path(fresh, torch.device("cpu"), block_size=64), fresh)
    state = tuned_state(fresh)
    assert state == tuned_state(net) and state["column_major"] == ["layers.1.self_attn.o_proj"]
    o = fresh.layers[1].self_attn.o_proj.weight
    assert o.stride() == (1, o.shape[0]) and torch.equal(o, net.layers[1].self_attn.o_proj.weight)
    assert fresh.layers[0].self_attn.o_proj.weight.is_contiguous()
    assert fresh.layers[1].mlp.down_proj.fp8_act_configs is None  # None (tile defaults) survives, not {} (cuBLASLt)
    assert fresh.layers[0].rows_plan[16]["qkv"] == (64, 256, 4, 2, 4)  # integer keys and tuples survive
    assert fresh.gemv_alternatives == {}  # the plan is final: the decode-step timing has nothing to try
    first = fresh.layers[0]
    assert all(lay.gemv_plan is first.gemv_plan and lay.rows_plan is first.rows_plan for lay in fresh.layers)
    # A record that knows a row-major weight turns a column-major one back.
    fresh.layers[0].self_attn.qkv_proj.weight.data = fresh.layers[0].self_attn.qkv_proj.weight.data.t().contiguous().t()
    apply_tuned_state(fresh, tuned_state(net))
    assert fresh.layers[0].self_attn.qkv_proj.weight.is_contiguous()


@pytest.mark.parametrize(
    "edit,reason",
    [
        (lambda s: s.update(column_major=["layers.9.self_attn.o_proj"]), "no linear layer of this model"),
        (lambda s: s["fp8"].update({"layers.0.input_layernorm": ({}, None)}), "no linear layer of this model"),
        (lambda s: s.pop("rows_plan"), "malformed record"),
        (lambda s: s.update(format=0), "not a record of format"),
    ],
)
def test_a_record_that_does_not_fit_changes_nothing_and_is_timed_again(tmp_path, caplog, edit, reason):
    net = make_net()
    tune_by_hand(net)
    state = tuned_state(net)
    edit(state)
    path = tmp_path / "record.txt"
    path.write_text(repr(state))
    fresh = make_net()
    before = tuned_state(fresh)
    with caplog.at_level(logging.WARNING, logger="engine"):
        assert not load_record(path, fresh)
    assert reason in caplog.text and "timing again" in caplog.text
    assert tuned_state(fresh) == before and fresh.layers[1].self_attn.o_proj.weight.is_contiguous()
    path.write_text("__import__('os').system('echo no')")  # only literals are read, nothing runs
    assert not load_record(path, fresh)


def test_a_record_is_named_by_what_the_choices_depend_on(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_TUNE_CACHE", str(tmp_path))
    net, cpu = make_net(), torch.device("cpu")
    path = record_path(net, cpu, block_size=64)
    assert record_path(make_net(), cpu, block_size=64) == path  # another start of the same shape
    assert record_path(make_net(intermediate_size=192), cpu, block_size=64) != path
    assert record_path(make_net(num_hidden_layers=3), cpu, block_size=64) != path
    assert record_path(net, cpu, block_size=16) != path
    monkeypatch.setenv("NANOVLLM_COMMIT", "a run's label")  # names a run, not a choice
    monkeypatch.setenv("NANOVLLM_COMPILE_PROCESSES", "0")  # how kernels compile, not which are chosen
    assert record_path(net, cpu, block_size=64) == path
    monkeypatch.setenv("NANOVLLM_GEMV", "force")  # a switch the timings read
    assert record_path(net, cpu, block_size=64) != path
    monkeypatch.setenv("NANOVLLM_TUNE_CACHE", "0")
    assert record_path(net, cpu, block_size=64) is None
    monkeypatch.delenv("NANOVLLM_TUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert record_path(net, cpu, block_size=64).parent == tmp_path / "xdg" / "nanovllm" / "tuning"


def test_a_record_that_cannot_be_written_only_warns(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="engine"):
        save_record(blocker / "sub" / "record.txt", make_net())  # its folder cannot be made under a file
    assert "could not keep the start-up choices" in caplog.text
