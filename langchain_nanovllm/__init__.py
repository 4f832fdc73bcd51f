"""LangChain integration of the nanovllm engine: the ChatNanoVLLM chat model and Prometheus metrics."""

from langchain_nanovllm.chat_models import ChatNanoVLLM
from langchain_nanovllm.metrics import attach_metrics, metrics_asgi_app, metrics_wsgi_app, start_metrics_server

__all__ = ["ChatNanoVLLM", "attach_metrics", "metrics_asgi_app", "metrics_wsgi_app", "start_metrics_server"]
