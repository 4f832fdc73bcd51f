"""Prometheus metrics: scraped over HTTP after known requests, and through a real Prometheus server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import LLM, SamplingParams
from langchain_nanovllm import attach_metrics, start_metrics_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(sample name, frozenset(labels)): value} from the live endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metrics_port():
    port = free_port()
    start_metrics_server(port)
    return port


@pytest.fixture(scope="module")
def served(qwen3_path, metrics_port):
    llm = LLM(qwen3_path, device="cpu")
    label = attach_metrics(llm)
    yield llm, label
    llm.shutdown()


def test_counters_and_histograms_match_the_requests(served, metrics_port):
    llm, label = served
    before = scrape(metrics_port)
    prompts = [[5 + i] * (10 + 7 * i) for i in range(5)]
    params = [SamplingParams(temperature=0, max_tokens=3 + i, ignore_eos=True) for i in range(5)]
    outs = llm.generate(prompts, params)
    after = scrape(metrics_port)

    def delta(name, **kw):
        return value(after, name, model_name=label, **kw) - value(before, name, model_name=label, **kw)

    assert delta("nanovllm_generation_tokens_total") == sum(len(o.token_ids) for o in outs)
    assert delta("nanovllm_prompt_tokens_total") == sum(len(p) for p in prompts)
    assert delta("nanovllm_request_success_total", finished_reason="length") == 5
    for h in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert delta(f"nanovllm_{h}_count") == 5, h
    assert delta("nanovllm_inter_token_latency_seconds_count") == sum(len(o.token_ids) - 1 for o in outs)
    assert delta("nanovllm_request_generation_tokens_sum") == sum(len(o.token_ids) for o in outs)
    assert value(after, "nanovllm_kv_cache_usage_perc", model_name=label) == 0.0
    assert value(after, "nanovllm_num_requests_running", model_name=label) == 0.0
    assert value(after, "nanovllm_kv_cache_blocks_total", model_name=label) == llm.stats()["kv_blocks_total"]
    assert value(after, "nanovllm_model_weights_bytes", model_name=label) == llm.memory()["weights_bytes"]
    assert value(after, "nanovllm_kv_cache_bytes", model_name=label) == llm.memory()["kv_cache_bytes"]
    info = [k for k in after if k[0] == "nanovllm_engine_info" and ("model_name", label) in k[1]]
    assert info and ("attention_backend", "torch") in info[0][1]


def test_prefix_cache_hits_appear_when_a_prompt_repeats(served, metrics_port):
    llm, label = served
    before = scrape(metrics_port)
    prompt = list(range(10, 60))
    llm.generate([prompt], SamplingParams(max_tokens=2))
    llm.generate([prompt], SamplingParams(max_tokens=2))
    after = scrape(metrics_port)
    hits = value(after, "nanovllm_prefix_cache_hits_total", model_name=label) - value(
        before, "nanovllm_prefix_cache_hits_total", model_name=label
    )
    queries = value(after, "nanovllm_prefix_cache_queries_total", model_name=label) - value(
        before, "nanovllm_prefix_cache_queries_total", model_name=label
    )
    assert hits == 48 and queries == 100


def test_startup_phases_are_exported_and_add_up(served, metrics_port):
    llm, label = served
    phases = llm.startup_seconds
    assert list(phases) == ["load", "quantize", "tune", "kv_cache", "cuda_graphs", "engine", "total"]
    assert phases["load"] > 0 and min(phases.values()) >= 0
    assert sum(s for p, s in phases.items() if p != "total") == pytest.approx(phases["total"])
    samples = scrape(metrics_port)
    for phase, seconds in phases.items():
        assert value(samples, "nanovllm_startup_seconds", model_name=label, phase=phase) == seconds, phase


def test_startup_time_lands_in_the_phase_that_spent_it(qwen3_path, monkeypatch, caplog):
    from engine.model_runner import ModelRunner

    allocate = ModelRunner.allocate_kv_cache

    def slow_allocate(self, *args, **kwargs):
        time.sleep(0.5)
        return allocate(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "allocate_kv_cache", slow_allocate)
    with caplog.at_level("INFO", logger="engine"):
        llm = LLM(qwen3_path, device="cpu")
    try:
        phases = llm.startup_seconds
        assert phases["kv_cache"] >= 0.5
        assert max(s for p, s in phases.items() if p not in ("kv_cache", "total")) < phases["kv_cache"]
        ready = [r.getMessage() for r in caplog.records if "ready in" in r.getMessage()]
        assert len(ready) == 1 and f"kv cache {phases['kv_cache']:.1f}s" in ready[0]
    finally:
        llm.shutdown()


def test_two_engines_are_two_labels(qwen3_path, served, metrics_port):
    llm, label = served
    other = LLM(qwen3_path, device="cpu")
    try:
        label2 = attach_metrics(other)
        assert label2 != label
        other.generate([[5, 6]], SamplingParams(max_tokens=2, ignore_eos=True))
        samples = scrape(metrics_port)
        assert value(samples, "nanovllm_kv_cache_blocks_total", model_name=label2) > 0
    finally:
        other.shutdown()


def test_busy_port_is_a_clear_error(metrics_port):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}.*another port"):
            start_metrics_server(port)


def test_real_prometheus_scrapes_the_endpoint(served, metrics_port, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have the Debian package prometheus (.ci/run installs it)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    llm, label = served
    llm.generate([[7] * 12] * 3, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    expected = value(scrape(metrics_port), "nanovllm_generation_tokens_total", model_name=label)
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: nanovllm\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import json
        import urllib.parse

        query = urllib.parse.quote(f'nanovllm_generation_tokens_total{{model_name="{label}"}}')
        found = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/query?query={query}", timeout=2)
                result = json.loads(body.read())["data"]["result"]
                if result:
                    found = float(result[0]["value"][1])
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert found == expected
    finally:
        proc.terminate()
        proc.wait(10)
