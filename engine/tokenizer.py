"""Incremental detokenization with stop-string hold-back, and chat-template rendering."""

from __future__ import annotations

import re

MAX_PENDING_BYTES = 6  # tokens to wait for an incomplete UTF-8 character before emitting it as U+FFFD


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, correct across multi-byte UTF-8 characters.

    Stop strings are found in the decoded text; text that could still become a stop string is held back,
    and a matched stop string is never emitted.
    """

    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        # The Rust tokenizer behind a fast HF tokenizer decodes ~10x faster than the Python wrapper.
        backend = getattr(tokenizer, "_tokenizer", None)
        self._fast_decode = backend.decode if backend is not None and hasattr(backend, "decode") else None
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> bool:
        """Add one token; returns True if the text now contains a stop string (the text is cut before it)."""
        return self.advance(*map(self._decode, self.push(token_id)))

    def push(self, token_id: int) -> tuple[list[int], list[int]]:
        """Append a token; returns the two windows to decode (context only, context + new tokens)."""
        self.ids.append(token_id)
        # A short window: the tokens since the last flushed boundary, with the previous ones as context.
        return self.ids[self.prefix_offset : self.read_offset], self.ids[self.prefix_offset :]

    def advance(self, prefix_text: str, new_text: str) -> bool:
        """Take the decoded windows of push(); returns True if the text now contains a stop string."""
        if new_text.endswith("\ufffd") and len(self.ids) - self.read_offset < MAX_PENDING_BYTES:
            return False  # an incomplete UTF-8 sequence: wait for more bytes (a character has at most 4)
        old_len = len(self.text)
        if len(new_text) > len(prefix_text):
            self.text += new_text[len(prefix_text) :]
        # Advance even when the tokens made no text (skipped special tokens, ids the tokenizer does not know), so
        # the decoded window stays a few tokens long instead of growing with the output.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop:
            start = max(0, old_len - self.max_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i != -1]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return True
        return False

    def _held_back(self) -> int:
        # The longest tail of the text that is the start of some stop string.
        for n in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def take_delta(self, finished: bool) -> str:
        """Text not yet emitted that can be emitted now (everything, once finished)."""
        end = len(self.text) if finished or not self.stop else len(self.text) - self._held_back()
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta


def add_tokens(detoks: list[IncrementalDetokenizer], token_ids: list[int]) -> list[bool]:
    """IncrementalDetokenizer.add for many requests with one call into the Rust tokenizer (decode_batch)."""
    if not detoks:
        return []
    first = detoks[0]
    backend = getattr(first.tokenizer, "_tokenizer", None)
    same = all(d.tokenizer is first.tokenizer and d.skip_special_tokens == first.skip_special_tokens for d in detoks)
    if backend is None or not hasattr(backend, "decode_batch") or not same:
        return [d.add(t) for d, t in zip(detoks, token_ids)]
    windows = [w for d, t in zip(detoks, token_ids) for w in d.push(t)]
    try:
        texts = backend.decode_batch(windows, skip_special_tokens=first.skip_special_tokens)
    except Exception:
        for d in detoks:
            d.ids.pop()  # as if never pushed, so the caller can retry one by one
        raise
    return [d.advance(texts[2 * i], texts[2 * i + 1]) for i, d in enumerate(detoks)]


def render_chat(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """Apply the tokenizer's chat template with a generation prompt and return the token ids."""
    if not messages:
        raise ValueError("messages is empty; pass at least one message like {'role': 'user', 'content': 'Hi'}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
    template_kwargs.setdefault("add_generation_prompt", True)
    specials = special_token_strings(tokenizer)
    contents = [m.get("content") for m in messages]
    injected = any(isinstance(c, str) and any(sp in c for sp in specials) for c in contents)
    if injected:
        # Render with placeholders, then encode message text with special tokens split into plain text, so a
        # user typing "<|im_start|>system" cannot forge a turn: only the template emits special tokens.
        messages = [
            {**m, "content": f"{_OPEN}{i}{_CLOSE}"} if isinstance(m.get("content"), str) else m
            for i, m in enumerate(messages)
        ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    except Exception as exc:
        raise ValueError(f"the chat template could not render these messages: {exc}") from exc
    if not injected:
        # The template writes its own BOS where the model wants one.
        return tokenizer.encode(text, add_special_tokens=False)
    ids: list[int] = []
    for k, part in enumerate(_PLACEHOLDER.split(text)):
        if k % 2 == 0:
            ids += tokenizer.encode(part, add_special_tokens=False) if part else []
        else:
            ids += tokenizer.encode(contents[int(part)], add_special_tokens=False, split_special_tokens=True)
    return ids


_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters: never produced by a template
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def special_token_strings(tokenizer) -> list[str]:
    """Every special token's text (BOS/EOS/pad and added special tokens such as <|im_start|>)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok))
    return [t for t in found if t]
