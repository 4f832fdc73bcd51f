"""The user-facing LLM: load a model, then generate, stream and chat."""

from __future__ import annotations

import gc
import logging
import os
import resource
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import torch
from pydantic import ValidationError
from tqdm.auto import tqdm

from engine.attention import make_backend
from engine.compile_pool import close_compile_pool, compile_processes_while, prestart_compile_pool
from engine.config import EngineConfig, resolve_device, resolve_dtype
from engine.layers.fp8 import fp8_unsupported_reason, quantize_model_fp8, tune_fp8_rows
from engine.layers.linear import TUNE_MARGIN, TUNE_STREAM_BYTES, tune_weight_layouts, weight_bytes
from engine.llm_engine import LLMEngine
from engine.loader import (
    conversion_folder,
    converted_source,
    iter_weights,
    load_config,
    load_tokenizer,
    parse_gguf_once,
    resolve_model,
    save_conversion,
)
from engine.model_runner import ModelRunner
from engine.models.llama import head_dim_of, sliding_window_of
from engine.models.registry import model_class_for
from engine.request import Request, RequestOutput, StreamDelta
from engine.sampling_params import SamplingParams
from engine.tokenizer import render_chat
from engine.tune_cache import load_record, record_path, save_record

logger = logging.getLogger("engine")

Prompt = str | Sequence[int]
FLASHINFER_HEAD_DIMS = (64, 128, 256)  # FlashInfer's paged kernels; the GPU kit prebuilds 64 and 128


class StartupClock:
    """Seconds each start-up phase took, in order: mark(phase) closes the phase that ran since the last mark."""

    def __init__(self):
        self._start = self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """End `phase` now (its time adds up if marked again)."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    def seconds(self) -> dict[str, float]:
        """Each phase's seconds and their `total` (the constructor's wall time up to the last mark)."""
        return {**self.phases, "total": self._last - self._start}


class RequestFailedError(RuntimeError):
    """A request failed inside the engine (for example a model step raised); other requests go on."""


def make_config(engine_kwargs: dict) -> EngineConfig:
    """Build an EngineConfig, turning unknown or invalid options into errors that name them."""
    unknown = sorted(set(engine_kwargs) - set(EngineConfig.model_fields))
    if unknown:
        raise TypeError(f"unknown engine option(s) {unknown}; allowed: {sorted(EngineConfig.model_fields)}")
    try:
        return EngineConfig(**engine_kwargs)
    except ValidationError as exc:
        raise ValueError(f"invalid engine option: {exc}") from exc


def startup_summary(seconds: dict[str, float]) -> str:
    """'12.3s (load 1.0s, tune 2.1s, ...)': the total and every phase that took 0.05 s or more."""
    parts = [f"{phase.replace('_', ' ')} {s:.1f}s" for phase, s in seconds.items() if phase != "total" and s >= 0.05]
    return f"{seconds['total']:.1f}s ({', '.join(parts)})" if parts else f"{seconds['total']:.1f}s"


def as_sampling_params(params) -> SamplingParams:
    """Accept SamplingParams, a dict of its fields, or None (defaults)."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        return SamplingParams(**params)
    raise TypeError(f"sampling_params must be SamplingParams, a dict or None, got {type(params).__name__}")


class LLM:
    """An in-process LLM engine: paged KV cache, continuous batching, prefix caching, chunked prefill."""

    def __init__(self, model: str | os.PathLike | None = None, **engine_kwargs):
        clock = StartupClock()
        self.config = config = make_config(engine_kwargs)
        self.device = torch.device(resolve_device(config.device))
        self.dtype = resolve_dtype(config.dtype, self.device.type)
        if config.quantization == "fp8":
            reason = fp8_unsupported_reason(self.device, self.dtype)
            if reason:
                raise ValueError(f"{reason}; use quantization=None")
        src = converted_source(resolve_model(model))
        self.model_name = src.name
        # A first start's Triton compiles may run in processes (engine/compile_pool.py): started during the load where
        # the start will time kernels, stopped once the graphs are recorded, also when the start fails.
        with compile_processes_while():
            self._start_up(src, clock)

    def _start_up(self, src, clock: StartupClock) -> None:
        # The constructor's work from the model's source on: load, timings, KV cache, graphs, engine.
        config = self.config
        with parse_gguf_once(src):  # the three GGUF reads (config, tokenizer, weights) share one parse
            hf_config = load_config(src)
            model_cls = model_class_for(hf_config)
            self.tokenizer = load_tokenizer(src)
            self.hf_config = hf_config
            limit = int(getattr(hf_config, "max_position_embeddings", 8192) or 8192)
            max_model_len = config.max_model_len or min(limit, 8192)
            if max_model_len > limit:
                raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}")
            backend_name = self._pick_backend()
            if config.block_size is None:
                # FlashInfer reads fewer, longer pages faster; the torch path gathers whole pages, so small ones.
                block_size = 64 if backend_name == "flashinfer" else 16
                self.config = config = config.model_copy(update={"block_size": block_size})
            window = sliding_window_of(hf_config)
            if window is not None and window < max_model_len and backend_name == "flashinfer":
                # The FlashInfer path has no sliding window yet (its kernels need a window variant the GPU kit does
                # not carry); up to the window's length, full attention is the same computation.
                if config.max_model_len is not None:
                    raise ValueError(
                        f"max_model_len={max_model_len} exceeds this model's {window}-token sliding attention "
                        f"window, which the FlashInfer path does not implement; use max_model_len<={window} or "
                        "attention_backend='torch'"
                    )
                logger.warning(
                    "%s attends within a %d-token sliding window, which the FlashInfer path does not implement: "
                    "max_model_len is %d (attention_backend='torch' serves longer sequences)",
                    src.name,
                    window,
                    window,
                )
                max_model_len = window
            fused = backend_name == "flashinfer"
            torch.manual_seed(config.seed)
            with torch.device("meta"):
                net = model_cls(hf_config, max_positions=max_model_len, fused=fused)
            net = net.to(self.dtype)
            compiles = backend_name == "flashinfer" and not config.enforce_eager or config.quantization == "fp8"
            record = None
            if self.device.type == "cuda":
                record = record_path(
                    net, self.device, block_size=config.block_size, backend=backend_name,
                    eager=config.enforce_eager, quantization=config.quantization,
                )  # fmt: skip
                if compiles and (record is None or not record.is_file()):
                    prestart_compile_pool()  # no kept choices: the timings will compile; its imports overlap the load
            net = net.to_empty(device=self.device)
            for module in net.modules():
                if hasattr(module, "reset_cache"):
                    module.reset_cache(self.device)
            if config.load_format == "dummy":
                init_dummy_weights(net, config.seed)
            else:
                # A GGUF model's dequantized tensors are all in memory while it loads: keep references to write them
                # once as a Hugging Face folder, which later loads read instead (converted_source).
                kept = {} if conversion_folder(src) is not None else None
                net.load_weights(self._cast(iter_weights(src, hf_config), kept))
                if kept:
                    save_conversion(src, hf_config, self.tokenizer, kept)
            net.eval()
        clock.mark("load")
        if config.quantization == "fp8":
            quantize_model_fp8(net)
        clock.mark("quantize")
        if self.device.type == "cpu":
            logger.info("%d linear weights pre-packed for oneDNN", net.pack_cpu())
        tuned = self.device.type != "cuda" or load_record(record, net)  # tuned: no timings to run and keep
        if not tuned and compiles:
            prestart_compile_pool()  # a no-op where the load started them; a record that did not fit starts them here
        if not tuned:
            tune_weight_layouts(net)
            if config.quantization == "fp8":
                tune_fp8_rows(net.layers, TUNE_STREAM_BYTES)
            if backend_name == "flashinfer" and not config.enforce_eager:
                # Triton launches cost ~20 us each from Python: the fused row kernels pay off in CUDA graphs only.
                net.tune_row_kernels(TUNE_STREAM_BYTES, TUNE_MARGIN)
        clock.mark("tune")  # the CPU's weight packing included
        self.runner = runner = ModelRunner(net, hf_config, self.device, self.dtype, config.seed)
        runner.backend = make_backend(backend_name, runner, config, window)
        runner.supports_cascade = backend_name == "flashinfer"
        num_blocks = self._num_kv_blocks(runner, max_model_len)
        runner.allocate_kv_cache(num_blocks, config.block_size)
        max_model_len = min(max_model_len, num_blocks * config.block_size)
        clock.mark("kv_cache")  # the memory-profiling forward at the largest batch shape included
        if backend_name == "flashinfer" and not config.enforce_eager:
            from engine.cuda_graphs import GraphRunner

            runner.graphs = GraphRunner(runner, config, max_model_len)
            runner.graphs.capture()
        if self.device.type == "cuda":
            # The sampling kernels compile in the compile processes while they are still up (after them, starting
            # them again took ~2 s of a first start).
            runner.sampler.warm(runner.vocab_size, self.dtype)
        close_compile_pool()  # the start-up's compiles are over
        if not tuned:
            save_record(record, net)  # after capture, whose step timing may have refined the one-row plan
        if self.device.type == "cuda" and os.environ.get("NANOVLLM_WARM_PATCH", "1") != "0":
            runner.warm_input_patch()
        clock.mark("cuda_graphs")  # with the start-up timings inside capture() and the input warm-up
        self.engine = LLMEngine(config, runner, self.tokenizer, num_blocks, max_model_len, self.model_name)
        self._froze_gc = config.freeze_gc
        if config.freeze_gc:
            # The start-up heap (torch, the model, its modules) is never garbage: keep full collections off it.
            gc.collect()
            gc.freeze()
        self.attention_backend = backend_name
        clock.mark("engine")
        self.startup_seconds = clock.seconds()
        kv_gib = runner.kv_cache_storage.nbytes / 2**30
        logger.info(
            "%s on %s (%s, %s attention): KV cache %d blocks x %d tokens = %d tokens (%.2f GiB), "
            "room for %d requests of max_model_len %d; ready in %s",
            self.model_name,
            self.device,
            str(self.dtype).removeprefix("torch.") + (", FP8 weights" if config.quantization == "fp8" else ""),
            backend_name,
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            kv_gib,
            num_blocks * config.block_size // max_model_len,
            max_model_len,
            startup_summary(self.startup_seconds),
        )

    def _cast(self, weights, kept: dict | None = None):
        for name, tensor in tqdm(weights, desc=f"Loading {self.model_name}", unit=" tensors", leave=False):
            if kept is not None:
                kept[name] = tensor
            yield name, tensor.to(device=self.device, dtype=self.dtype)

    def _pick_backend(self) -> str:
        from engine.layers.kernels import flashinfer_available

        choice = self.config.attention_backend
        head_dim = head_dim_of(self.hf_config)
        if choice == "auto":
            if self.device.type == "cuda" and flashinfer_available():
                if head_dim in FLASHINFER_HEAD_DIMS:
                    return "flashinfer"
                logger.warning("head_dim %d has no FlashInfer kernels; using the torch attention backend", head_dim)
            return "torch"
        if choice == "flashinfer" and (self.device.type != "cuda" or not flashinfer_available()):
            raise ValueError(
                "attention_backend='flashinfer' needs a CUDA device and the flashinfer package "
                "(pip install .[cuda]); use attention_backend='torch' or 'auto'"
            )
        if choice == "flashinfer" and head_dim not in FLASHINFER_HEAD_DIMS:
            raise ValueError(
                f"attention_backend='flashinfer' supports head_dim {FLASHINFER_HEAD_DIMS}, this model has {head_dim}; "
                "use attention_backend='torch' or 'auto'"
            )
        return choice

    def _num_kv_blocks(self, runner: ModelRunner, max_model_len: int) -> int:
        cfg = self.config
        per_block = runner.kv_bytes_per_block(cfg.block_size)
        per_seq = -(-max_model_len // cfg.block_size)
        if cfg.num_kvcache_blocks is not None:
            return cfg.num_kvcache_blocks
        if self.device.type == "cuda":
            budget = runner.profile_free_memory(cfg, max_model_len)
        else:
            budget = int(cfg.cpu_kv_cache_gib * 2**30)
        blocks = min(budget // per_block, per_seq * cfg.max_num_seqs)
        if blocks < 1:
            raise RuntimeError(
                f"no memory left for the KV cache ({budget / 2**30:.2f} GiB free, {per_block} bytes per block); "
                "raise gpu_memory_utilization or cpu_kv_cache_gib, or lower max_num_seqs"
            )
        return int(blocks)

    @property
    def max_model_len(self) -> int:
        """Longest prompt plus output this engine serves."""
        return self.engine.max_model_len

    # ---- requests ----

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is an empty string; pass some text")
            return self.tokenizer.encode(prompt)
        # The engine's validation checks each id (type and range) in one C-speed pass, and the request copies the
        # list it is given: no copy here (a 4k-token list less for each prompt, and for the garbage collector).
        if isinstance(prompt, list):
            return prompt
        if isinstance(prompt, tuple):
            return list(prompt)
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def submit(
        self, prompt: Prompt, sampling_params=None, request_id: str | None = None, stream: bool = True
    ) -> Request:
        """Queue one request without waiting; read its deltas from the returned request's channel (with
        stream=False only the final one, which carries the whole text)."""
        params = as_sampling_params(sampling_params)
        return self.engine.add_request(self._token_ids(prompt), params, request_id, stream=stream)

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """Generate for one prompt or a batch; returns one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = [as_sampling_params(p) for p in sampling_params]
        else:
            params = [as_sampling_params(sampling_params)] * len(prompts)
        ids = [self._token_ids(p) for p in prompts]
        # All at once: validated before any is queued, and the first step sees the whole batch.
        reqs = self.engine.add_requests([(t, p, None) for t, p in zip(ids, params)], stream=False)
        outputs = []
        try:
            for req in reqs:
                outputs.append(_drain(req))
        except BaseException:
            for req in reqs:
                self.engine.abort(req.request_id)
            raise
        return outputs

    def stream(self, prompt: Prompt, sampling_params=None) -> Iterator[StreamDelta]:
        """Yield text deltas as tokens are produced; leaving the loop early aborts the request."""
        return iterate(self.engine, self.submit(prompt, sampling_params))

    def chat(self, messages: list[dict], sampling_params=None, **chat_template_kwargs) -> RequestOutput:
        """Render messages through the chat template and generate the assistant's reply."""
        ids = render_chat(self.tokenizer, messages, **chat_template_kwargs)
        return self.generate([ids], sampling_params)[0]

    def chat_stream(self, messages: list[dict], sampling_params=None, **chat_template_kwargs) -> Iterator[StreamDelta]:
        """Streaming twin of chat()."""
        return self.stream(render_chat(self.tokenizer, messages, **chat_template_kwargs), sampling_params)

    async def astream(self, prompt: Prompt, sampling_params=None) -> AsyncIterator[StreamDelta]:
        """Async deltas, awaited from the engine thread without a thread per request."""
        async for delta in aiterate(self.engine, self.submit(prompt, sampling_params)):
            yield delta

    async def agenerate(self, prompt: Prompt, sampling_params=None) -> RequestOutput:
        """Async generate for one prompt."""
        async for delta in self.astream(prompt, sampling_params):
            if delta.finished:
                return delta.output
        raise RuntimeError("stream ended without a final output")

    # ---- state ----

    def stats(self) -> dict:
        """Request and KV-block counts (see LLMEngine.stats)."""
        return self.engine.stats()

    def memory(self) -> dict:
        """Bytes used by weights, KV cache, activations/graphs, and what is free."""
        runner = self.runner
        weights = weight_bytes(runner.model) if runner.model else 0
        kv = runner.kv_cache_storage.nbytes if runner.kv_cache_storage is not None else 0
        report = {"device": str(self.device), "weights_bytes": weights, "kv_cache_bytes": kv}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            allocated = torch.cuda.memory_allocated(self.device)
            report.update(
                activations_and_graphs_bytes=max(torch.cuda.memory_reserved(self.device) - weights - kv, 0),
                gpu_memory_used_bytes=allocated,
                gpu_memory_reserved_bytes=torch.cuda.memory_reserved(self.device),
                gpu_memory_total_bytes=total,
                free_bytes=free,
            )
        else:
            rss = _rss_bytes()
            report.update(
                activations_and_graphs_bytes=max(rss - weights - kv, 0), process_rss_bytes=rss, free_bytes=None
            )
        return report

    def shutdown(self) -> None:
        """Stop the engine thread, fail pending requests with EngineShutdownError, and free memory."""
        self.engine.shutdown()
        if getattr(self, "_froze_gc", False):
            gc.unfreeze()  # the process's objects are collected as before (another engine's included)
            self._froze_gc = False


@torch.no_grad()
def init_dummy_weights(net: torch.nn.Module, seed: int) -> None:
    """Random weights with the checkpoint's shapes: N(0, 0.02) for matrices, ~1 for norms."""
    g = torch.Generator(device=next(net.parameters()).device).manual_seed(seed)
    for name, p in net.named_parameters():
        if "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32))


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _raise_failure(req: Request, exc: BaseException):
    raise RequestFailedError(f"request {req.request_id} failed: {type(exc).__name__}: {exc}") from exc


def _drain(req: Request) -> RequestOutput:
    while True:
        item = req.channel.get()
        if isinstance(item, BaseException):
            _raise_failure(req, item)
        if item.finished:
            return item.output


def iterate(engine: LLMEngine, req: Request) -> Iterator[StreamDelta]:
    """Blocking iterator over a request's deltas; closing it early aborts the request."""
    done = False
    try:
        while True:
            item = req.channel.get()
            if isinstance(item, BaseException):
                done = True
                _raise_failure(req, item)
            if item.finished:
                done = True
            yield item
            if done:
                return
    finally:
        if not done:
            engine.abort(req.request_id)


async def aiterate(engine: LLMEngine, req: Request) -> AsyncIterator[StreamDelta]:
    """Async iterator over a request's deltas; cancellation or aclose() aborts the request."""
    done = False
    try:
        while True:
            item = await req.channel.aget()
            if isinstance(item, BaseException):
                done = True
                _raise_failure(req, item)
            if item.finished:
                done = True
            yield item
            if done:
                return
    finally:
        if not done:
            engine.abort(req.request_id)
