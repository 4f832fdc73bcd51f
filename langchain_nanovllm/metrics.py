"""Prometheus metrics for nanovllm engines (vLLM's names with the prefix nanovllm_), and the /metrics endpoint.

Per-request histograms and token counters are observed once, when a request finishes, from the timestamps the
engine stamped on it; gauges and cache counters are read from LLM.stats() / LLM.memory() at scrape time.
"""

from __future__ import annotations

import threading
import weakref

from prometheus_client import REGISTRY, Counter, Histogram, make_asgi_app, make_wsgi_app, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from engine.llm_engine import StepObserver

LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 320.0, 640.0, 1280.0, 1920.0, 2560.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

_lock = threading.RLock()  # re-entrant: registering the collector calls collect()
_engines: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # label -> LLM
_servers: dict[tuple[str, int], object] = {}
_collectors = None


def _histogram(name: str, doc: str, buckets) -> Histogram:
    return Histogram(f"nanovllm_{name}", doc, ["model_name"], buckets=buckets)


class _Collectors:
    """The process-wide metric objects, created once so several engines never register twice."""

    def __init__(self):
        self.ttft = _histogram("time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.itl = _histogram("inter_token_latency_seconds", "Time between consecutive tokens.", LATENCY_BUCKETS)
        self.e2e = _histogram("e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue = _histogram("request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS)
        self.prefill = _histogram("request_prefill_time_seconds", "First scheduled to first token.", LATENCY_BUCKETS)
        self.decode = _histogram("request_decode_time_seconds", "First token to finish.", LATENCY_BUCKETS)
        self.prompt_hist = _histogram("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.gen_hist = _histogram("request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS)
        self.iter_tokens = _histogram("iteration_tokens", "Tokens computed per engine step.", TOKEN_BUCKETS)
        self.prompt_tokens = Counter("nanovllm_prompt_tokens", "Prompt tokens of finished requests.", ["model_name"])
        self.gen_tokens = Counter(
            "nanovllm_generation_tokens", "Generated tokens of finished requests.", ["model_name"]
        )
        self.success = Counter(
            "nanovllm_request_success", "Finished requests by reason.", ["model_name", "finished_reason"]
        )
        REGISTRY.register(_EngineStateCollector())


class _EngineStateCollector:
    """Reads every attached engine's stats and memory report at scrape time."""

    def collect(self):
        """Yield gauges, cache counters and engine info."""
        gauges = {
            "num_requests_running": ("Requests in the running batch.", lambda s, m: s["num_running"]),
            "num_requests_waiting": ("Requests waiting to be scheduled.", lambda s, m: s["num_waiting"]),
            "kv_cache_usage_perc": ("KV blocks held by live requests (0..1).", lambda s, m: s["kv_cache_usage"]),
            "kv_cache_blocks_total": ("KV cache blocks.", lambda s, m: s["kv_blocks_total"]),
            "kv_cache_bytes": ("Bytes of the KV cache.", lambda s, m: m["kv_cache_bytes"]),
            "model_weights_bytes": ("Bytes of model weights.", lambda s, m: m["weights_bytes"]),
            "gpu_memory_used_bytes": ("GPU memory torch allocated.", lambda s, m: m.get("gpu_memory_used_bytes")),
            "gpu_memory_reserved_bytes": ("GPU memory torch reserved.", lambda s, m: m.get("gpu_memory_reserved_bytes")),  # noqa: E501
            "gpu_memory_total_bytes": ("GPU memory in total.", lambda s, m: m.get("gpu_memory_total_bytes")),
        }  # fmt: skip
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", "prefix_cache_queried_tokens"),
            "prefix_cache_hits": ("Prompt tokens served from the prefix cache.", "prefix_cache_hit_tokens"),
            "num_preemptions": ("Requests preempted for lack of KV blocks.", "num_preemptions"),
            "cascade_attention_steps": ("Decode steps that ran cascade attention.", "num_cascade_steps"),
        }
        with _lock:
            engines = list(_engines.items())
        families = {
            name: GaugeMetricFamily(f"nanovllm_{name}", doc, labels=["model_name"]) for name, (doc, _) in gauges.items()
        }
        cfams = {
            name: CounterMetricFamily(f"nanovllm_{name}", doc, labels=["model_name"])
            for name, (doc, _) in counters.items()
        }
        info = InfoMetricFamily("nanovllm_engine", "Engine configuration.", labels=["model_name"])
        startup = GaugeMetricFamily(
            "nanovllm_startup_seconds",
            "Seconds each start-up phase took (phase total: all of them).",
            labels=["model_name", "phase"],
        )
        for label, llm in engines:
            if llm.engine._stopped:
                continue
            stats, mem = llm.stats(), llm.memory()
            for name, (_, get) in gauges.items():
                value = get(stats, mem)
                if value is not None:
                    families[name].add_metric([label], float(value))
            for name, (_, key) in counters.items():
                cfams[name].add_metric([label], float(stats[key]))
            for phase, seconds in llm.startup_seconds.items():
                startup.add_metric([label, phase], seconds)
            cfg = llm.config
            info.add_metric(
                [label],
                {
                    "model": llm.model_name,
                    "dtype": str(llm.dtype).removeprefix("torch."),
                    "device": str(llm.device),
                    "block_size": str(cfg.block_size),
                    "attention_backend": llm.attention_backend,
                    "max_model_len": str(llm.max_model_len),
                },
            )
        yield from families.values()
        yield from cfams.values()
        yield startup
        yield info


class RequestMetrics(StepObserver):
    """Feeds one engine's finished requests and steps into the histograms and counters."""

    def __init__(self, label: str):
        global _collectors
        with _lock:
            if _collectors is None:
                _collectors = _Collectors()
        self.c = _collectors
        self.label = label

    def on_step(self, engine, out, num_generated, cascade) -> None:
        """Observe tokens per step."""
        self.c.iter_tokens.labels(self.label).observe(out.num_tokens)

    def on_finish(self, engine, req) -> None:
        """Observe the request's latencies and token counts from its timestamps."""
        c, lab = self.c, self.label
        c.success.labels(lab, req.finish_reason or "unknown").inc()
        c.prompt_tokens.labels(lab).inc(req.num_prompt_tokens)
        c.gen_tokens.labels(lab).inc(req.num_output_tokens)
        c.prompt_hist.labels(lab).observe(req.num_prompt_tokens)
        c.gen_hist.labels(lab).observe(req.num_output_tokens)
        c.e2e.labels(lab).observe(req.finish_time - req.arrival_time)
        if req.scheduled_time is not None:
            c.queue.labels(lab).observe(req.scheduled_time - req.arrival_time)
        if req.first_token_time is not None:
            c.ttft.labels(lab).observe(req.first_token_time - req.arrival_time)
            c.decode.labels(lab).observe(req.finish_time - req.first_token_time)
            if req.scheduled_time is not None:
                c.prefill.labels(lab).observe(req.first_token_time - req.scheduled_time)
        itl = c.itl.labels(lab)
        times = req.token_times
        for a, b in zip(times, times[1:]):
            itl.observe(b - a)


def attach_metrics(llm) -> str:
    """Start exporting an engine's metrics (idempotent); returns its model_name label."""
    with _lock:
        for label, other in _engines.items():
            if other is llm:
                return label
        label = llm.model_name
        n = 2
        while label in _engines:
            label = f"{llm.model_name}#{n}"
            n += 1
        _engines[label] = llm
    llm.engine.observers.append(RequestMetrics(label))
    return label


def start_metrics_server(port: int = 9400, addr: str = "127.0.0.1", reuse: bool = False) -> None:
    """Serve /metrics over HTTP on addr:port (loopback unless told otherwise); a busy port is a clear error."""
    key = (addr, port)
    with _lock:
        if key in _servers:
            if reuse:
                return
            raise RuntimeError(f"a nanovllm metrics server already runs on {addr}:{port}")
        global _collectors
        if _collectors is None:
            _collectors = _Collectors()
        try:
            _servers[key] = start_http_server(port, addr=addr)
        except OSError as exc:
            raise RuntimeError(
                f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}; choose another port (metrics_port=...)"
            ) from exc


def metrics_wsgi_app():
    """A WSGI app serving the metrics, to mount in an existing web server."""
    return make_wsgi_app()


def metrics_asgi_app():
    """An ASGI app serving the metrics, to mount in an existing web server."""
    return make_asgi_app()
