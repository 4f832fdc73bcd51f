"""ChatNanoVLLM behaviour: callbacks, concurrency, cancellation, usage, tools, reasoning, errors."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from helpers import wait_idle
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.prompts import ChatPromptTemplate

from langchain_nanovllm import ChatNanoVLLM
from langchain_nanovllm.chat_models import _Turn
from langchain_nanovllm.tool_parsing import ThinkSplitter, ToolCallStreamParser, parse_all

from .conftest import ENGINE


class Collect(BaseCallbackHandler):
    """Records every streamed token and chunk."""

    def __init__(self):
        self.tokens: list[str] = []
        self.chunks: list = []

    def on_llm_new_token(self, token, *, chunk=None, **kwargs):
        self.tokens.append(token)
        self.chunks.append(chunk)


class ACollect(AsyncCallbackHandler):
    """Async twin of Collect."""

    def __init__(self):
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token, **kwargs):
        self.tokens.append(token)


def test_instances_share_one_engine(chat):
    other = ChatNanoVLLM(temperature=0.5, max_tokens=8, engine_kwargs=ENGINE)
    assert other.llm is chat.llm


def test_invoke_streaming_true_sends_every_token_to_callbacks_in_order(chat):
    handler = Collect()
    model = chat.model_copy(update={"streaming": True})
    msg = model.invoke("What is the capital of France?", config={"callbacks": [handler]})
    assert len(handler.tokens) > 3
    assert "".join(handler.tokens) == msg.content
    last = [c for c in handler.chunks if c.message.chunk_position == "last"]
    assert len(last) == 1 and handler.chunks[-1] is last[0]
    assert all(c.message.usage_metadata is None for c in handler.chunks[:-1])
    assert all(not c.message.response_metadata for c in handler.chunks[:-1])


def test_lcel_chain_streams_through_callbacks(chat):
    handler = Collect()
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | chat | StrOutputParser()
    pieces = list(chain.stream({"q": "Name a color."}, config={"callbacks": [handler]}))
    assert "".join(pieces) == "".join(handler.tokens)
    assert len(pieces) > 1


async def test_astream_callbacks_match_content(chat):
    handler = ACollect()
    parts = [c async for c in chat.astream("Say hello.", config={"callbacks": [handler]})]
    assert "".join(handler.tokens) == "".join(p.content for p in parts)
    final = parts[-1]
    assert final.chunk_position == "last" and final.usage_metadata["output_tokens"] > 0


def test_usage_metadata_counts_tokens_and_cache_reads(chat):
    q = [HumanMessage("Explain what a prefix cache is in one sentence, for a beginner reader.")]
    first = chat.invoke(q)
    second = chat.invoke(q)
    u = second.usage_metadata
    assert u["input_tokens"] == first.usage_metadata["input_tokens"] == chat.get_num_tokens_from_messages(q)
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert u["input_token_details"]["cache_read"] >= 16
    assert second.response_metadata["finish_reason"] in ("stop", "length")
    assert second.response_metadata["time_to_first_token_s"] > 0


def _record_calls(monkeypatch, cls, name: str) -> list:
    """Patch cls.name (a method of one argument) to record each argument it is called with; returns the record."""
    seen = []
    method = getattr(cls, name)

    def recorded(self, arg):
        seen.append(arg)
        return method(self, arg)

    monkeypatch.setattr(cls, name, recorded)
    return seen


@pytest.mark.parametrize("call", ["invoke", "ainvoke"])
def test_invoke_takes_one_delta_with_the_text_the_stream_adds_up_to(chat, monkeypatch, call):
    """invoke() and ainvoke(), which stream nothing, take only the final delta (the whole text) from the engine and
    build one chunk from it: the text and token counts the stream's chunks add up to."""
    q = [HumanMessage("Name three colours.")]
    streamed = list(chat.stream(q))
    built = _record_calls(monkeypatch, _Turn, "chunk")
    msg = chat.invoke(q) if call == "invoke" else asyncio.run(chat.ainvoke(q))
    assert len(streamed) > 3 and len(built) == 1 and built[0].finished
    assert msg.content == "".join(c.content for c in streamed)
    usage = streamed[-1].usage_metadata  # the second call reads its prompt from the prefix cache: compare counts
    assert msg.usage_metadata["input_tokens"] == usage["input_tokens"]
    assert msg.usage_metadata["output_tokens"] == usage["output_tokens"] == len(streamed)


def test_a_turns_chunks_merge_in_one_add(monkeypatch):
    """The chunks of a streamed turn merge in one add of the whole list (one by one built a new message each)."""
    usage = {"input_tokens": 3, "output_tokens": 20, "total_tokens": 23}
    chunks = [ChatGenerationChunk(message=AIMessageChunk(content=f"t{i} ")) for i in range(19)]
    chunks.append(ChatGenerationChunk(message=AIMessageChunk(content="end", usage_metadata=usage)))
    adds = _record_calls(monkeypatch, ChatGenerationChunk, "__add__")
    msg = ChatNanoVLLM._result(chunks).generations[0].message
    assert [len(a) if isinstance(a, list) else 1 for a in adds] == [19]
    assert msg.content == "".join(f"t{i} " for i in range(19)) + "end" and msg.usage_metadata == usage


async def test_sixteen_concurrent_ainvokes_run_as_one_batch(chat):
    model = chat.model_copy(update={"max_tokens": 24})
    msgs = [HumanMessage("Write a long story about a dragon.")]
    await model.ainvoke(msgs)  # warm: loads and caches the prompt
    t = time.perf_counter()
    one = await model.ainvoke(msgs)
    single = time.perf_counter() - t
    t = time.perf_counter()
    many = await asyncio.gather(*[model.ainvoke(msgs) for _ in range(16)])
    concurrent = time.perf_counter() - t
    assert all(m.content == one.content for m in many)
    # Sequential would take 16x; batched decode costs little more than one request per step.
    assert concurrent / single < 6, f"16 concurrent took {concurrent / single:.1f}x one"


def test_batch_and_abatch_return_in_order(chat):
    prompts = ["Count to three.", "Name a fruit.", "Say yes."]
    ref = [chat.invoke(p).content for p in prompts]
    assert [m.content for m in chat.batch(prompts)] == ref
    assert [m.content for m in asyncio.run(chat.abatch(prompts))] == ref


def test_batch_runs_every_input_in_the_same_engine_steps(chat, monkeypatch):
    """batch() starts all its inputs at once, not on Runnable.batch's pool of min(32, cores + 4) threads: on a
    one-core machine that pool ran 5 of 8 inputs, then the other 3 after them."""
    import os

    for name in ("cpu_count", "process_cpu_count"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, lambda: 1)
    msgs = [HumanMessage("Write a long story about a lighthouse keeper.")]
    one = chat.invoke(msgs)  # also caches the prompt, as it is for the batch
    wait_idle(chat.llm)
    start = chat.llm.stats()["num_steps"]
    again = chat.invoke(msgs)
    single = chat.llm.stats()["num_steps"] - start
    start = chat.llm.stats()["num_steps"]
    many = chat.batch([msgs] * 8)
    batched = chat.llm.stats()["num_steps"] - start
    assert again.content == one.content and [m.content for m in many] == [one.content] * 8
    assert single >= 24, "the answer should be long enough for two rounds of requests to show"
    # All 8 decode in the same steps (late arrivals add a prefill step each); two rounds would take ~2x.
    assert batched <= single + 8, f"8 inputs took {batched} steps, one took {single}"


def test_break_out_of_stream_aborts_and_frees_blocks(chat):
    model = chat.model_copy(update={"max_tokens": 200})
    for i, _ in enumerate(model.stream("Tell me a very long story about the sea.")):
        if i == 2:
            break
    assert wait_idle(chat.llm)["kv_blocks_used"] == 0


async def test_cancelled_task_aborts_and_frees_blocks(chat):
    model = chat.model_copy(update={"max_tokens": 200})

    async def consume():
        async for _ in model.astream("Tell me a very long story about mountains."):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wait_idle(chat.llm)["kv_blocks_used"] == 0


def test_image_content_is_rejected_with_supported_types(chat):
    msg = HumanMessage(content=[{"type": "text", "text": "hi"}, {"type": "image", "url": "http://x/y.png"}])
    with pytest.raises(ValueError, match="'image'.*supported block types: text"):
        chat.invoke([msg])


def test_per_call_overrides(chat):
    short = chat.invoke("Tell me about the moon.", max_tokens=3)
    assert short.usage_metadata["output_tokens"] == 3
    assert short.response_metadata["finish_reason"] == "length"


def test_tokens_come_from_the_engine_tokenizer(chat):
    ids = chat.get_token_ids("Hello world")
    assert ids == chat.llm.tokenizer.encode("Hello world", add_special_tokens=False)
    assert chat.get_num_tokens("Hello world") == len(ids)
    assert chat._llm_type == "nanovllm-chat"
    assert chat._get_ls_params()["ls_provider"] == "nanovllm"


def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return f"sunny in {city}"


def test_tool_history_round_trips_through_the_template(chat):
    history = [
        SystemMessage("You are helpful."),
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}]),
        ToolMessage("sunny in Paris", tool_call_id="call_1"),
    ]
    ids, _, _ = chat._prepare(history, None, {})
    text = chat.llm.tokenizer.decode(ids)
    assert '"name": "get_weather"' in text and '"city": "Paris"' in text
    assert "sunny in Paris" in text
    answer = chat.bind_tools([get_weather]).invoke(history)
    assert isinstance(answer, AIMessage)


def test_named_tool_choice_forces_the_call_prefix(chat):
    from langchain_core.utils.function_calling import convert_to_openai_tool

    tools = [convert_to_openai_tool(get_weather)]
    ids, _, turn = chat._prepare([HumanMessage("Paris?")], None, {"tools": tools, "tool_choice": "get_weather"})
    tail = chat.llm.tokenizer.decode(ids[-12:])
    assert tail.endswith('{"name": "get_weather", "arguments": ')
    assert turn.prefill.startswith("<tool_call>")
    msg = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("What's the weather in Paris?")
    # Whatever the small model writes, a forced call is either a parsed call to that tool or an invalid call.
    assert [c["name"] for c in msg.tool_calls] in ([], ["get_weather"])
    assert msg.tool_calls or msg.invalid_tool_calls


def test_tool_choice_must_name_a_bound_tool(chat):
    with pytest.raises(ValueError, match="not one of the bound tools"):
        chat.bind_tools([get_weather], tool_choice="nope")


@given(text=st.text(max_size=60), cuts=st.lists(st.integers(0, 200), max_size=8))
@settings(max_examples=200, deadline=None)
def test_tool_call_parser_never_raises_and_is_split_invariant(text, cuts):
    call = json.dumps({"name": "f", "arguments": {"x": text}})
    full = f"before {text}<tool_call>\n{call}\n</tool_call> after<tool_call>{{bad json {text}</tool_call>"
    whole_content, whole_calls = parse_all(full)
    parser = ToolCallStreamParser()
    content, calls = "", []
    points = sorted({min(c, len(full)) for c in cuts} | {0, len(full)})
    for a, b in zip(points, points[1:]):
        c, k = parser.feed(full[a:b])
        content += c
        calls += k
    c, k = parser.flush()
    content += c
    calls += k
    # Split invariance holds for any text.
    assert content == whole_content
    assert [(x.name, x.args, x.error is None) for x in calls] == [
        (x.name, x.args, x.error is None) for x in whole_calls
    ]
    if "<tool_call>" in text or "</tool_call>" in text:
        return  # the text itself opens or closes a call, so the layout below does not apply
    assert content == f"before {text} after"
    assert calls[0].name == "f" and calls[0].args == {"x": text}
    assert calls[1].error is not None and calls[1].name is None
    assert calls[0].id != calls[1].id


def test_tool_call_parser_on_text_that_contains_the_tag():
    # Found by hypothesis: a literal tag in the text starts a call there, and splitting must not change that.
    full = 'before <tool_call><tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> after'
    whole_content, whole_calls = parse_all(full)
    parser = ToolCallStreamParser()
    content, calls = "", []
    for i in range(0, len(full), 3):
        c, k = parser.feed(full[i : i + 3])
        content += c
        calls += k
    c, k = parser.flush()
    content, calls = content + c, calls + k
    assert content == whole_content
    assert [(x.name, x.error is None) for x in calls] == [(x.name, x.error is None) for x in whole_calls]
    assert "<tool_call>" not in content


@given(st.text(max_size=80))
@settings(max_examples=200, deadline=None)
def test_tool_call_parser_survives_arbitrary_text(text):
    content, calls = parse_all(text)
    for c in calls:
        assert (c.args is None) == (c.error is not None)


@pytest.mark.parametrize("start_in_think", [False, True])
def test_think_split_at_every_cut_position(start_in_think):
    body = "Let me think: 2+2 <is> 4." if start_in_think else "<think>\nLet me think: 2+2 <is> 4.\n</think>\n\n"
    text = body + ("</think>\n\n" if start_in_think else "") + "The answer is 4 <b>!</b>"
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            s = ThinkSplitter(start_in_think)
            r, c = "", ""
            for part in (text[:i], text[i:j], text[j:]):
                a, b = s.feed(part)
                r, c = r + a, c + b
            a, b = s.flush()
            r, c = r + a, c + b
            assert c == "The answer is 4 <b>!</b>", (i, j, c)
            assert r.strip() == "Let me think: 2+2 <is> 4."
            assert "<think>" not in c and "</think>" not in c and "</think>" not in r


def test_reasoning_true_moves_thinking_out_of_content(chat):
    """A Qwen3-style stream through the chunk builder: thinking goes to reasoning_content, never to content."""
    from engine.request import RequestOutput, StreamDelta
    from langchain_nanovllm.chat_models import _Turn

    model = chat.model_copy(update={"reasoning": True})
    turn = _Turn(model, [1, 2, 3], "", parse_tools=False, think=True, start_in_think=False)
    pieces = ["<th", "ink>\nplan: add", " 2 and 2</thi", "nk>\n\nThe answer", " is 4."]
    out = RequestOutput("r", [1, 2, 3], list(range(len(pieces))), "", "stop", 0, 0.0, 0.1, 0.2)
    chunks = [
        turn.chunk(
            StreamDelta("r", p, [i], finished=i == len(pieces) - 1, output=out if i == len(pieces) - 1 else None)
        )
        for i, p in enumerate(pieces)
    ]
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    msg = merged.message
    assert msg.content == "The answer is 4."
    assert msg.additional_kwargs["reasoning_content"].strip() == "plan: add 2 and 2"
    assert msg.usage_metadata["output_token_details"]["reasoning"] >= 2
    assert "<think>" not in msg.content and "</think>" not in msg.content


def test_reasoning_flag_reaches_the_chat_template(chat, monkeypatch):
    seen = {}
    tok = chat.llm.tokenizer
    original = tok.apply_chat_template

    def spy(messages, **kwargs):
        seen.update(kwargs)
        return original(messages, **kwargs)

    monkeypatch.setattr(tok, "apply_chat_template", spy)
    chat.model_copy(update={"reasoning": False})._prepare([HumanMessage("hi")], None, {})
    assert seen["enable_thinking"] is False
