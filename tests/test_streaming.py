"""Incremental detokenization, stop strings, streaming and abort."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import SamplingParams
from engine.tokenizer import MAX_PENDING_BYTES, IncrementalDetokenizer

TEXTS = ["Hello world! 日本語 🙂 Ünïcödé", "Paris is the capital of France.", "emoji 🙂🙂 and 日本"]


@given(text=st.sampled_from(TEXTS), stop_at=st.integers(0, 40), stop_len=st.integers(1, 6))
@settings(max_examples=80, deadline=None)
def test_streamed_deltas_are_valid_utf8_and_stop_strings_never_escape(tokenizer, text, stop_at, stop_len):
    ids = tokenizer.encode(text)
    stop_at = min(stop_at, len(text) - 1)
    stop = text[stop_at : stop_at + stop_len]
    detok = IncrementalDetokenizer(tokenizer, [stop])
    emitted = ""
    stopped = False
    for t in ids:
        stopped = detok.add(t)
        delta = detok.take_delta(stopped)
        assert "\ufffd" not in delta
        emitted += delta
        assert stop not in emitted
        if stopped:
            break
    assert stopped
    assert emitted == text[: text.find(stop)]


def stream_deltas(tokenizer, ids: list[int]) -> list[str]:
    """The deltas an incremental detokenizer emits for ids, one token at a time, then the final flush."""
    detok = IncrementalDetokenizer(tokenizer, [])
    parts = []
    for t in ids:
        detok.add(t)
        parts.append(detok.take_delta(False))
    return parts + [detok.take_delta(True)]


def test_deltas_concatenate_to_the_full_decode(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text)
        parts = stream_deltas(tokenizer, ids)
        # Byte-level BPE splits 🙂 and 日 over several tokens: no delta may hold half a character.
        assert all("\ufffd" not in p for p in parts)
        assert "".join(parts) == tokenizer.decode(ids) == text


def test_sentencepiece_style_deltas_concatenate_to_the_full_decode():
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import sentencepiece_style_tokenizer

    tok = sentencepiece_style_tokenizer()
    rng = random.Random(0)
    alphabet = list("abc xyz\nÜ日🙂.,")
    texts = [" Paris is  the capital.", "a\nb  c", "  two leading", "zebra quokka ÿ þ", "mixed 🙂🙂 ünï  end "]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    byte_fallback_seen = False
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        byte_fallback_seen |= any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))
        # Leading "▁" spaces at window boundaries and byte-fallback characters survive the incremental decode.
        assert "".join(stream_deltas(tok, ids)) == tok.decode(ids, skip_special_tokens=True), text
    assert byte_fallback_seen


def test_stream_matches_generate_and_ends_with_the_output(qwen3_llm):
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ref = qwen3_llm.generate([[5, 6, 7]], p)[0]
    deltas = list(qwen3_llm.stream([5, 6, 7], p))
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    assert [len(d.token_ids) for d in deltas] == [1] * 20  # one stream: a delta per token
    assert "".join(d.text for d in deltas) == ref.text
    assert deltas[-1].finished and deltas[-1].output.token_ids == ref.token_ids
    assert not any(d.finished for d in deltas[:-1])


@pytest.mark.parametrize("interval, max_tokens", [(4, 20), (4, 18), (7, 3)])
def test_stream_interval_sends_the_first_token_at_once_then_every_nth(qwen3_llm, monkeypatch, interval, max_tokens):
    """With stream_interval n the first token goes alone, then n tokens a delta; the final delta carries the rest,
    and the deltas add up to generate()'s tokens and text."""
    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ref = qwen3_llm.generate([[5, 6, 7]], p)[0]
    engine = qwen3_llm.engine
    monkeypatch.setattr(engine, "config", engine.config.model_copy(update={"stream_interval": interval}))
    deltas = list(qwen3_llm.stream([5, 6, 7], p))
    # Tokens 2..max_tokens-1 go in full groups; the last token ends the request and takes the remainder with it.
    groups, rest = divmod(max_tokens - 2, interval)
    assert [len(d.token_ids) for d in deltas] == [1] + [interval] * groups + [rest + 1]
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    assert "".join(d.text for d in deltas) == ref.text and deltas[-1].finished


def test_eight_streams_get_four_tokens_a_delta_after_the_first(qwen3_llm):
    """With stream_interval unset, 8 requests streaming at once get 4 tokens a delta (half their number) after the
    first token, which goes alone; each adds up to generate()'s tokens and text."""
    p = SamplingParams(temperature=0, max_tokens=18, ignore_eos=True)
    prompts = [[5, 6, 7 + i] for i in range(8)]
    refs = qwen3_llm.generate(prompts, p)
    reqs = qwen3_llm.engine.add_requests([(ids, p, None) for ids in prompts], stream=True)
    for req, ref in zip(reqs, refs):
        deltas = [req.channel.get(timeout=60)]
        while not deltas[-1].finished:
            deltas.append(req.channel.get(timeout=60))
        assert [len(d.token_ids) for d in deltas] == [1, 4, 4, 4, 4, 1]
        assert [t for d in deltas for t in d.token_ids] == ref.token_ids
        assert "".join(d.text for d in deltas) == ref.text


def test_requests_queued_without_streaming_get_only_their_final_output(qwen3_llm):
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    streamed = qwen3_llm.generate([[5, 6, 7], [9, 10]], p)  # generate() queues with stream=False itself
    engine = qwen3_llm.engine
    for stream, expected_items in ((False, 1), (True, 12)):
        reqs = engine.add_requests([([5, 6, 7], p, None), ([9, 10], p, None)], stream=stream)
        for req, ref in zip(reqs, streamed):
            items = []
            while not items or not items[-1].finished:
                items.append(req.channel.get(timeout=60))
            assert len(items) == expected_items
            out = items[-1].output
            assert out.token_ids == ref.token_ids and out.text == ref.text
            # The final delta carries whatever text was not streamed before it.
            assert "".join(d.text for d in items) == ref.text


def test_stop_string_ends_generation_and_is_not_returned(qwen3_llm):
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = qwen3_llm.generate([[5, 6, 7]], p)[0]
    stop = ref.text[5:8]
    out = qwen3_llm.generate([[5, 6, 7]], p.model_copy(update={"stop": [stop]}))[0]
    assert out.finish_reason == "stop"
    assert out.text == ref.text[: ref.text.find(stop)]
    assert stop not in "".join(d.text for d in qwen3_llm.stream([5, 6, 7], p.model_copy(update={"stop": [stop]})))


def test_breaking_out_of_a_stream_aborts_and_frees_blocks(qwen3_llm):
    import time

    stream = qwen3_llm.stream([5] * 40, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    for _ in range(200):
        s = qwen3_llm.stats()
        if s["kv_blocks_used"] == 0 and s["num_running"] == 0:
            break
        time.sleep(0.01)
    assert qwen3_llm.stats()["kv_blocks_used"] == 0


def test_sequence_lengths_advance_every_step(qwen3_llm):
    """The old engine's gibberish came from stale sequence lengths: computed tokens must track each step."""
    engine = qwen3_llm.engine
    seen = []
    original = engine.runner.launch

    def spy(out, *args):
        seen.extend((s.req.request_id, s.start, s.num_new_tokens, s.req.num_tokens) for s in out.scheduled)
        return original(out, *args)

    engine.runner.launch = spy
    try:
        qwen3_llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    finally:
        engine.runner.launch = original
    starts = [s for _, s, _, _ in seen]
    assert starts == [0, 5, 6, 7, 8]
    assert all(start + n == total for _, start, n, total in seen)


def test_requests_ending_while_the_next_step_runs_keep_exactly_their_tokens(qwen3_llm, tokenizer):
    """Steps are launched before the previous one is collected: a request that stops (stop token, stop string)
    is already in the next step, whose token for it must be dropped; its neighbours must not notice."""
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    a, b, c = [5, 6, 7], [9, 10, 11, 12], [20, 21]
    ref_a, ref_b, ref_c = qwen3_llm.generate([a, b, c], greedy)
    k = 6
    stop_id = ref_a.token_ids[k]
    first = ref_a.token_ids.index(stop_id)
    stop_text = ref_b.text[4:7]
    # The shortest prefix of b's tokens whose text contains the stop string is where b must end.
    end_b = next(n for n in range(1, len(ref_b.token_ids) + 1) if stop_text in tokenizer.decode(ref_b.token_ids[:n]))
    out_a, out_b, out_c = qwen3_llm.generate(
        [a, b, c],
        [
            greedy.model_copy(update={"stop_token_ids": [stop_id]}),
            greedy.model_copy(update={"stop": [stop_text]}),
            greedy,
        ],
    )
    assert out_a.finish_reason == "stop" and out_a.token_ids == ref_a.token_ids[: first + 1]
    assert out_b.finish_reason == "stop" and out_b.token_ids == ref_b.token_ids[:end_b]
    assert out_b.text == ref_b.text[: ref_b.text.find(stop_text)]
    assert out_c.token_ids == ref_c.token_ids and out_c.finish_reason == "length"


def test_batched_detokenization_equals_one_by_one(tokenizer):
    from engine.tokenizer import add_tokens

    texts = [*TEXTS, "stop here please", "日本語 and more 🙂 text"]
    streams = [tokenizer.encode(t) for t in texts]
    stops = [[], ["capital"], ["🙂"], ["here"], ["and"]]
    one = [IncrementalDetokenizer(tokenizer, s) for s in stops]
    many = [IncrementalDetokenizer(tokenizer, s) for s in stops]
    for step in range(max(map(len, streams))):
        live = [i for i, ids in enumerate(streams) if step < len(ids) and not one[i].stopped]
        expected = [one[i].add(streams[i][step]) for i in live]
        assert add_tokens([many[i] for i in live], [streams[i][step] for i in live]) == expected
        for i in live:
            assert many[i].take_delta(False) == one[i].take_delta(False)
    assert [d.text for d in many] == [d.text for d in one]
    assert any(d.stopped for d in one)


def test_tokens_without_text_keep_the_decode_window_short(tokenizer):
    """Special tokens (skipped), ids the tokenizer does not know and broken UTF-8 must not make every later
    token re-decode a window that grows with the output (quadratic cost), and text around them still streams."""
    lone_byte = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd")
    detok = IncrementalDetokenizer(tokenizer, [])
    silent = [tokenizer.eos_token_id, len(tokenizer) + 1000] * 50 + [lone_byte] * 20
    for t in tokenizer.encode("before ") + silent + tokenizer.encode("after"):
        context, window = detok.push(t)
        assert len(window) <= 2 * MAX_PENDING_BYTES + 1  # never more than two waits' worth
        detok.advance(tokenizer.decode(context), tokenizer.decode(window))
    assert detok.text.startswith("before ") and detok.text.endswith("after")
