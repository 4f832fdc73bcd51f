"""Stream parsers for model output: `<think>` reasoning and Hermes/Qwen `<tool_call>` blocks.

Both take text deltas in any split (a tag may arrive one character at a time) and never evaluate anything:
tool-call arguments are parsed as JSON only.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag (it may still become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Splits a stream into reasoning (inside <think>...</think>) and content."""

    def __init__(self, start_in_think: bool = False):
        self.in_think = start_in_think
        self.buffer = ""
        self.seen_close = False
        self.strip_newlines = False  # the blank lines after </think> belong to neither part

    def feed(self, delta: str) -> tuple[str, str]:
        """Add text; return (reasoning, content) that can be emitted now."""
        self.buffer += delta
        if self.strip_newlines:
            self.buffer = self.buffer.lstrip("\n")
            self.strip_newlines = not self.buffer
        reasoning, content = [], []
        while self.buffer:
            tag = THINK_CLOSE if self.in_think else THINK_OPEN
            i = self.buffer.find(tag)
            if i >= 0:
                (reasoning if self.in_think else content).append(self.buffer[:i])
                self.buffer = self.buffer[i + len(tag) :]
                if self.in_think:
                    self.seen_close = True
                    self.buffer = self.buffer.lstrip("\n")
                    self.strip_newlines = not self.buffer
                self.in_think = not self.in_think
                continue
            keep = _partial_suffix(self.buffer, tag)
            out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
            (reasoning if self.in_think else content).append(out)
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of stream: whatever is held back is text after all."""
        rest, self.buffer = self.buffer, ""
        return (rest, "") if self.in_think else ("", rest)


@dataclass
class ParsedToolCall:
    """One tool call found in the output: valid (name + args) or invalid (raw text + error)."""

    id: str
    name: str | None
    args: dict | None
    raw: str
    error: str | None = None


def new_call_id() -> str:
    """A unique tool-call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_call(body: str) -> ParsedToolCall:
    """Parse the JSON inside one <tool_call> block; anything malformed becomes an invalid call."""
    raw = body.strip()
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        return ParsedToolCall(new_call_id(), None, None, raw, f"invalid JSON: {exc}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ParsedToolCall(new_call_id(), None, None, raw, "expected an object with a string 'name'")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            return ParsedToolCall(new_call_id(), obj["name"], None, raw, f"arguments are not JSON: {exc}")
    if not isinstance(args, dict):
        return ParsedToolCall(new_call_id(), obj["name"], None, raw, "arguments must be a JSON object")
    return ParsedToolCall(new_call_id(), obj["name"], args, raw)


@dataclass
class ToolCallStreamParser:
    """Streams text outside <tool_call> blocks and yields each block as one complete call when it closes."""

    buffer: str = ""
    in_call: bool = False
    calls: list[ParsedToolCall] = field(default_factory=list)

    def feed(self, delta: str) -> tuple[str, list[ParsedToolCall]]:
        """Add text; return (content to emit now, calls completed by this delta)."""
        self.buffer += delta
        content: list[str] = []
        done: list[ParsedToolCall] = []
        while True:
            if self.in_call:
                i = self.buffer.find(TOOL_CLOSE)
                if i < 0:
                    break
                call = parse_tool_call(self.buffer[:i])
                done.append(call)
                self.buffer = self.buffer[i + len(TOOL_CLOSE) :]
                self.in_call = False
                continue
            i = self.buffer.find(TOOL_OPEN)
            if i >= 0:
                content.append(self.buffer[:i])
                self.buffer = self.buffer[i + len(TOOL_OPEN) :]
                self.in_call = True
                continue
            keep = _partial_suffix(self.buffer, TOOL_OPEN)
            content.append(self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
            break
        self.calls.extend(done)
        return "".join(content), done

    def flush(self) -> tuple[str, list[ParsedToolCall]]:
        """End of stream: an unclosed block is still parsed (the model may stop at EOS right after the JSON)."""
        rest, self.buffer = self.buffer, ""
        if self.in_call:
            self.in_call = False
            call = parse_tool_call(rest)
            self.calls.append(call)
            return "", [call]
        return rest, []


def parse_all(text: str) -> tuple[str, list[ParsedToolCall]]:
    """Parse a whole output at once: (content outside tool calls, calls)."""
    parser = ToolCallStreamParser()
    content, calls = parser.feed(text)
    rest, more = parser.flush()
    return content + rest, calls + more
