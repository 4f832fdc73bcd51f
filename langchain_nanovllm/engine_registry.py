"""One engine per (model, engine configuration) per process, shared by every ChatNanoVLLM that asks for it."""

from __future__ import annotations

import json
import threading

from engine import LLM

_engines: dict[tuple[str, str], LLM] = {}
_lock = threading.Lock()


def engine_key(model, engine_kwargs: dict) -> tuple[str, str]:
    """The registry key: the model as given and the options as canonical JSON."""
    return (str(model), json.dumps(engine_kwargs, sort_keys=True, default=str))


def get_engine(model, engine_kwargs: dict) -> LLM:
    """The shared engine for this model and configuration, loading it on first use."""
    key = engine_key(model, engine_kwargs)
    with _lock:
        llm = _engines.get(key)
        if llm is None or llm.engine._stopped:
            llm = LLM(model, **engine_kwargs)
            _engines[key] = llm
        return llm


def shutdown_all() -> None:
    """Shut down every shared engine (tests, interpreter exit)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for llm in engines:
        llm.shutdown()
