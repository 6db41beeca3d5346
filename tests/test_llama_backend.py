"""The llama.cpp backend on real tiny GGUF models: completion, streaming, stop strings,
continuous batching (slots, chunked prefill, prefix reuse), embeddings, token counting, the log
bridge and bad model files."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import gguf
import llama_cpp  # noqa: F401  (a hard dependency: a broken install must fail, not skip)
import numpy as np
import pytest

from zeta import (
    BackendError,
    ContextWindowExceeded,
    InvalidRequestError,
    Kind,
    ModelLoadError,
    ModelSpec,
)
from zeta.backends import Completion, CompletionParams, get_backend
from zeta.backends._base import BatchBackend
from zeta.backends.llama_cpp import LlamaCppBackend, _held_back, check_model_file, open_backend
from zeta.testing import LadderModel, make_model

PROMPT = "def main(): return the answer"


def _spec(path: Path, **kw: Any) -> ModelSpec:
    kw.setdefault("kinds", frozenset({Kind.SIMPLE, Kind.CODE, Kind.REASON}))
    # Flash attention off: attention is then exact per sequence, so a request gives the same
    # tokens alone and batched, which most tests here compare (see the module's docstring).
    kw["options"] = {"flash_attn": False, **kw.get("options", {})}
    return ModelSpec(name=kw.pop("name", "m"), path=str(path), n_ctx=kw.pop("n_ctx", 256), **kw)


@pytest.fixture
def coder(tiny_models: dict[str, Path]) -> Iterator[LlamaCppBackend]:
    backend = open_backend(_spec(tiny_models["coder-tiny"]), 0)
    yield backend
    backend.close()


# -- completion -----------------------------------------------------------------------------


def test_complete_runs_exactly_to_max_tokens(coder: LlamaCppBackend) -> None:
    result = coder.complete(CompletionParams(PROMPT, max_tokens=12))
    assert result.completion_tokens == 12
    assert result.finish_reason == "length"
    assert result.prompt_tokens == coder.count_tokens(PROMPT) + 1  # plus <s>
    assert result.text.strip()
    assert 0.0 < result.first_token_s <= result.service_s


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(
    coder: LlamaCppBackend,
) -> None:
    greedy = [coder.complete(CompletionParams(PROMPT, max_tokens=16)).text for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = {
        seed: [
            coder.complete(CompletionParams(PROMPT, max_tokens=16, temperature=1.0, seed=seed))
            for _ in range(2)
        ]
        for seed in (1, 2, 3)
    }
    for runs in sampled.values():
        assert runs[0].text == runs[1].text
        assert runs[0].completion_tokens == 16  # no early end-of-sequence when sampling either
    assert len({runs[0].text for runs in sampled.values()}) > 1


def test_stream_pieces_join_to_the_text(coder: LlamaCppBackend) -> None:
    pieces: list[str] = []
    result = coder.complete(CompletionParams(PROMPT, max_tokens=10), pieces.append)
    assert "".join(pieces) == result.text
    assert all(pieces) and len(pieces) == 10


def test_on_token_false_stops_and_leaves_the_context_usable(
    coder: LlamaCppBackend, tiny_models: dict[str, Path]
) -> None:
    pieces: list[str] = []
    stopped = coder.complete(
        CompletionParams(PROMPT, max_tokens=50), lambda p: pieces.append(p) or len(pieces) < 3
    )
    assert stopped.finish_reason == "cancelled"
    assert stopped.completion_tokens == 3 and stopped.text == "".join(pieces)
    # The KV cache still holds the abandoned completion; the next request must not see it.
    after = coder.complete(CompletionParams("another prompt entirely", max_tokens=8))
    again = coder.complete(CompletionParams(PROMPT, max_tokens=8))
    fresh = open_backend(_spec(tiny_models["coder-tiny"]), 1)
    try:
        assert after.text == fresh.complete(CompletionParams("another prompt entirely", 8)).text
        assert again.text == fresh.complete(CompletionParams(PROMPT, max_tokens=8)).text
    finally:
        fresh.close()


def test_shared_prefix_reuses_the_cache_without_changing_results(
    coder: LlamaCppBackend, tiny_models: dict[str, Path]
) -> None:
    long = PROMPT + " because the value of the model is data"
    n_prompt = coder.count_tokens(PROMPT) + 1  # plus <s>
    coder.complete(CompletionParams(PROMPT, max_tokens=4))
    assert (coder.prefix_hits, coder.prefix_tokens_reused) == (0, 0)
    reused = coder.complete(CompletionParams(long, max_tokens=8))
    assert (coder.prefix_hits, coder.prefix_tokens_reused) == (1, n_prompt)
    same = coder.complete(CompletionParams(long, max_tokens=8))  # fully cached prompt
    n_long = coder.count_tokens(long) + 1
    # All but the last prompt token, which is decoded again for fresh logits.
    assert (coder.prefix_hits, coder.prefix_tokens_reused) == (2, n_prompt + n_long - 1)
    fresh = open_backend(_spec(tiny_models["coder-tiny"]), 1)
    try:
        expected = fresh.complete(CompletionParams(long, max_tokens=8)).text
        assert fresh.prefix_hits == 0
    finally:
        fresh.close()
    assert reused.text == same.text == expected


def test_admission_picks_the_slot_sharing_the_longest_prefix(
    tiny_models: dict[str, Path],
) -> None:
    """Two transcripts cached in two slots; each continuation lands in the slot holding its own
    prefix (a continuation landing in the other slot would share only ``<s>``: no hit)."""
    a, b = PROMPT, "import class self list dict the answer because"
    follow = [b + " because value", a + " because value"]  # b's first: not just slot order
    backend = open_backend(_spec(tiny_models["coder-tiny"], slots=2), 0)
    try:
        _run_together(backend, [CompletionParams(a, 6), CompletionParams(b, 6)])
        assert backend.prefix_hits == 0
        again = _run_together(backend, [CompletionParams(p, 6) for p in follow])
        assert backend.prefix_hits == 2
        shared = backend.count_tokens(a) + backend.count_tokens(b) + 2
        assert backend.prefix_tokens_reused >= shared
    finally:
        backend.close()
    fresh = open_backend(_spec(tiny_models["coder-tiny"], slots=2), 1)
    try:
        expected = [fresh.complete(CompletionParams(p, 6)).text for p in follow]
    finally:
        fresh.close()
    assert [again[0].text, again[1].text] == expected


def test_stop_string_cuts_the_text_and_is_never_streamed(coder: LlamaCppBackend) -> None:
    full = coder.complete(CompletionParams(PROMPT, max_tokens=24)).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    pieces: list[str] = []
    result = coder.complete(CompletionParams(PROMPT, max_tokens=24, stop=(stop,)), pieces.append)
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert "".join(pieces) == result.text
    assert result.completion_tokens < 24


class _EndOfGenerationAfter:
    """``llama_cpp`` as the backend sees it, except that the ``n``-th sampled token onwards is an
    end-of-generation token (the ladder's models never pick one by themselves)."""

    def __init__(self, lib: Any, n: int) -> None:
        self._lib, self._left = lib, n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def llama_vocab_is_eog(self, vocab: Any, token: int) -> bool:
        self._left -= 1
        return self._left < 0


def test_end_of_generation_keeps_text_held_back_for_a_stop_string(
    coder: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = coder.complete(CompletionParams(PROMPT, max_tokens=6)).text
    monkeypatch.setattr(coder, "_lib", _EndOfGenerationAfter(coder._lib, 6))
    pieces: list[str] = []
    # The last character could start this stop string, so it is held back when the model ends.
    params = CompletionParams(PROMPT, max_tokens=20, stop=(full[-1] + "\x00",))
    result = coder.complete(params, pieces.append)
    assert (result.finish_reason, result.completion_tokens) == ("stop", 6)
    assert result.text == full == "".join(pieces)


class _FailingTopK:
    """The real library, except that building a top-k sampler fails; records sampler frees."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.freed: list[object] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def llama_sampler_init_top_k(self, k: int) -> object:
        raise RuntimeError("no top-k today")

    def llama_sampler_free(self, chain: object) -> None:
        self.freed.append(chain)
        self._lib.llama_sampler_free(chain)


def test_a_sampler_that_fails_to_build_frees_the_chain(
    coder: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = _FailingTopK(coder._lib)
    monkeypatch.setattr(coder, "_lib", lib)
    with pytest.raises(RuntimeError, match="no top-k"):
        coder.complete(CompletionParams(PROMPT, max_tokens=4, temperature=0.7))
    assert len(lib.freed) == 1
    monkeypatch.undo()
    assert coder.complete(CompletionParams(PROMPT, max_tokens=4)).completion_tokens == 4


def test_stop_string_never_seen_changes_nothing(coder: LlamaCppBackend) -> None:
    full = coder.complete(CompletionParams(PROMPT, max_tokens=16))
    pieces: list[str] = []
    result = coder.complete(
        CompletionParams(PROMPT, max_tokens=16, stop=("\x00never",)), pieces.append
    )
    assert result.text == full.text == "".join(pieces)
    assert result.finish_reason == "length"


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [("abc", ("cd",), 1), ("abc", ("xbcd",), 0), ("abc", ("bcx", "cy"), 2), ("", ("a",), 0),
     ("abc", ("abcd",), 3), ("aaa", ("aab",), 2)],
)  # fmt: skip
def test_held_back_is_longest_suffix_that_starts_a_stop(
    text: str, stops: tuple[str, ...], held: int
) -> None:
    assert _held_back(text, stops, max(len(s) for s in stops)) == held


def test_multibyte_output_counts_tokens_not_characters(tmp_path: Path) -> None:
    # A model allowed to emit raw byte tokens produces characters split across tokens.
    model = LadderModel("bytes-tiny", "coder", n_embd=64, n_layer=1, n_head=2, n_ff=128,
                        byte_output=True)  # fmt: skip
    backend = open_backend(_spec(make_model(model, directory=tmp_path)), 0)
    split_seen = False
    try:
        for seed in range(4):
            pieces: list[str] = []
            params = CompletionParams("héllo wörld 日本", max_tokens=40, temperature=1.0, seed=seed)
            result = backend.complete(params, pieces.append)
            assert result.completion_tokens == 40  # tokens, however many characters they made
            assert "".join(pieces) == result.text
            # A token that ends mid-character yields no piece until the character is whole.
            split_seen |= len(pieces) < 40 and any(ord(c) > 127 for c in result.text)
    finally:
        backend.close()
    assert split_seen


def test_prompt_and_max_tokens_must_fit_a_slot(tiny_models: dict[str, Path]) -> None:
    """``n_ctx`` is one slot's context: prompt + max_tokens beyond it is refused before the
    context is touched, while the other sequences keep running."""
    backend = open_backend(_spec(tiny_models["coder-tiny"], n_ctx=32), 0)
    try:
        assert backend.n_ctx == 32  # exactly the spec's, however llama.cpp pads its buffer
        alone = backend.complete(CompletionParams(PROMPT, max_tokens=8))
        n_prompt = backend.count_tokens("x") + 1
        backend.admit(1, CompletionParams(PROMPT, max_tokens=8), None)
        backend.step()
        with pytest.raises(InvalidRequestError, match="context of 32 tokens per request"):
            backend.admit(2, CompletionParams("word " * 40, max_tokens=4), None)
        with pytest.raises(ContextWindowExceeded, match=f"max_tokens {33 - n_prompt};") as info:
            backend.admit(3, CompletionParams("x", max_tokens=33 - n_prompt), None)
        error = info.value
        assert (error.model, error.n_ctx, error.prompt_tokens) == ("m", 32, n_prompt)
        assert error.max_tokens == 33 - n_prompt
        with pytest.raises(InvalidRequestError, match="at least 1"):
            backend.admit(4, CompletionParams("x", max_tokens=0), None)
        # The sequence admitted before goes on unharmed, and exactly 32 tokens fit.
        backend.admit(5, CompletionParams("x", max_tokens=32 - n_prompt), None)
        done: dict[int, Completion] = {}
        while len(done) < 2:
            done.update(backend.step())
        assert done[1].text == alone.text
        assert done[5].completion_tokens == 32 - n_prompt
        assert done[5].finish_reason == "length"
    finally:
        backend.close()


LONE_SURROGATE = json.loads('"\\ud800"')


def test_text_that_is_not_valid_unicode_is_an_invalid_request(
    tiny_models: dict[str, Path],
) -> None:
    """A lone surrogate (valid JSON, not valid Unicode) fails the request, not the context."""
    spec = _spec(tiny_models["embedder-tiny"], kinds=frozenset({Kind.EMBED, Kind.SIMPLE}))
    backend = open_backend(spec, 0)
    try:
        expected = backend.complete(CompletionParams(PROMPT, max_tokens=4)).text
        for call in (
            lambda: backend.complete(CompletionParams(f"ok {LONE_SURROGATE} ok", max_tokens=4)),
            lambda: backend.embed(["fine", LONE_SURROGATE]),
            lambda: backend.count_tokens(LONE_SURROGATE),
        ):
            with pytest.raises(InvalidRequestError, match=r"not valid Unicode.*ud800"):
                call()
        assert backend.complete(CompletionParams(PROMPT, max_tokens=4)).text == expected
        assert len(backend.embed(["fine"]).vectors) == 1
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("params", "message"),
    [(CompletionParams(PROMPT, temperature=math.nan), "temperature"),
     (CompletionParams(PROMPT, temperature=math.inf), "temperature"),
     (CompletionParams(PROMPT, max_tokens=2.5), "max_tokens"),  # type: ignore[arg-type]
     (CompletionParams(PROMPT, seed=None), "seed"),  # type: ignore[arg-type]
     (CompletionParams(PROMPT, stop=("ok", 3)), "stop"),  # type: ignore[arg-type]
     (CompletionParams(b"bytes"), "must be a string")],  # type: ignore[arg-type]
)  # fmt: skip
def test_bad_request_values_are_invalid_requests(
    coder: LlamaCppBackend, params: CompletionParams, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        coder.complete(params)
    assert coder.complete(CompletionParams(PROMPT, max_tokens=2)).completion_tokens == 2


def test_embed_needs_a_sequence_of_strings(tiny_models: dict[str, Path]) -> None:
    backend = open_backend(_spec(tiny_models["embedder-tiny"], kinds=frozenset({Kind.EMBED})), 0)
    try:
        for texts in ("one string", None, [b"bytes"]):
            with pytest.raises(InvalidRequestError):
                backend.embed(texts)  # type: ignore[arg-type]
    finally:
        backend.close()


# -- continuous batching -------------------------------------------------------------------


def _run_together(
    backend: BatchBackend,
    requests: list[CompletionParams],
    pieces: dict[int, list[str]] | None = None,
) -> dict[int, Completion]:
    """Admit ``requests`` as sequences 0, 1, ... and step until all end (pieces streamed into
    ``pieces`` if given)."""
    for i, params in enumerate(requests):
        on_token = None
        if pieces is not None:
            on_token = pieces.setdefault(i, []).append
        backend.admit(i, params, on_token)  # type: ignore[arg-type]
    keys = range(len(requests))
    return dict(zip(keys, _run_together_after(backend, *keys), strict=True))


def _run_together_after(backend: BatchBackend, *keys: int) -> list[Completion]:
    """Step until the already admitted ``keys`` end; their completions in ``keys`` order."""
    done: dict[int, Completion] = {}
    while not set(keys) <= set(done):
        done.update(backend.step())
    return [done[k] for k in keys]


BATCH = [
    CompletionParams(PROMPT, max_tokens=20),
    CompletionParams("import class self list " * 6, max_tokens=7),
    CompletionParams("x", max_tokens=31),
    CompletionParams("the model routes each request", max_tokens=14, temperature=0.9, seed=7),
]


def test_batched_requests_produce_exactly_what_they_produce_alone(
    coder: LlamaCppBackend,
) -> None:
    """Four sequences of different prompt and output lengths decoded together (one of them
    sampled, with its own seeded chain): each streams the same pieces, token for token, as when
    it runs alone."""
    assert isinstance(coder, BatchBackend) and coder.slots == 4
    alone_pieces: list[list[str]] = []
    alone: list[Completion] = []
    for params in BATCH:
        alone_pieces.append([])
        alone.append(coder.complete(params, alone_pieces[-1].append))
    pieces: dict[int, list[str]] = {}
    together = _run_together(coder, BATCH, pieces)
    for i, result in enumerate(alone):
        assert together[i] == dataclasses.replace(
            result, first_token_s=together[i].first_token_s, service_s=together[i].service_s
        )
        assert pieces[i] == alone_pieces[i]
        assert 0.0 < together[i].first_token_s <= together[i].service_s
    assert [together[i].completion_tokens for i in range(4)] == [20, 7, 31, 14]


def test_cancelling_one_sequence_changes_nothing_for_the_others(coder: LlamaCppBackend) -> None:
    expected = [coder.complete(params).text for params in BATCH]
    seen: list[str] = []

    def stop_after_three(piece: str) -> bool:
        seen.append(piece)
        return len(seen) < 3

    coder.admit(0, BATCH[0], None)
    coder.admit(1, BATCH[1], None)
    coder.admit(2, BATCH[2], stop_after_three)
    coder.admit(3, BATCH[3], None)
    done: dict[int, Completion] = {}
    for _ in range(4):
        done.update(coder.step())
    coder.cancel(1)  # between steps, through the API
    coder.cancel(99)  # unknown keys are ignored
    while len(done) < 3:
        done.update(coder.step())
    assert coder.step() == []
    assert set(done) == {0, 2, 3}
    assert done[2].finish_reason == "cancelled" and done[2].completion_tokens == 3
    assert done[2].text == "".join(seen) == expected[2][: len(done[2].text)]
    assert [done[0].text, done[3].text] == [expected[0], expected[3]]
    # Both freed slots take new work.
    again = _run_together(coder, BATCH)
    assert [again[i].text for i in range(4)] == expected


def test_an_on_token_that_raises_drops_its_own_sequence_only(coder: LlamaCppBackend) -> None:
    """The exception propagates out of the step; sequences not yet sampled in that step (one
    decoding, two that had just read their prompts) take their last token back and go on
    unchanged."""
    expected = [coder.complete(params).text for params in BATCH]
    pieces: list[str] = []

    def boom(piece: str) -> bool:
        pieces.append(piece)
        if len(pieces) == 2:
            raise RuntimeError("callback failed")
        return True

    coder.admit(0, BATCH[0], boom)
    coder.admit(1, BATCH[1], None)
    coder.step()  # both read their prompts and get a first token
    coder.admit(2, BATCH[2], None)
    coder.admit(3, BATCH[3], None)
    with pytest.raises(RuntimeError, match="callback failed"):
        coder.step()  # 0 is sampled first; 1, and 2 and 3 done reading, never are
    done = _run_together_after(coder, 1, 2, 3)
    assert [c.text for c in done] == expected[1:]
    assert coder.step() == []  # sequence 0 is gone


def test_flash_attention_batches_too(tiny_models: dict[str, Path]) -> None:
    """llama.cpp's default attention kernel: exact token counts, and the same batch gives the
    same text (only against a run alone may a near-tie differ; see the module doc)."""
    spec = _spec(tiny_models["coder-tiny"], options={"flash_attn": "auto"})
    runs = []
    for replica in (0, 1):
        backend = open_backend(spec, replica)
        try:
            runs.append(_run_together(backend, BATCH))
            more = [dataclasses.replace(p, prompt=p.prompt + " more") for p in BATCH]
            _run_together(backend, more)
            assert backend.prefix_hits == 4
        finally:
            backend.close()
    assert [runs[0][i].completion_tokens for i in range(4)] == [20, 7, 31, 14]
    assert [runs[0][i].text for i in range(4)] == [runs[1][i].text for i in range(4)]


def test_a_full_context_refuses_admission_until_a_slot_frees(
    tiny_models: dict[str, Path],
) -> None:
    backend = open_backend(_spec(tiny_models["coder-tiny"], slots=2), 0)
    try:
        backend.admit(0, CompletionParams(PROMPT, max_tokens=2), None)
        with pytest.raises(BackendError, match="already admitted"):
            backend.admit(0, CompletionParams(PROMPT, max_tokens=2), None)
        backend.admit(1, CompletionParams(PROMPT, max_tokens=5), None)
        with pytest.raises(BackendError, match="all 2 slots are taken"):
            backend.admit(2, CompletionParams(PROMPT, max_tokens=2), None)
        ended: list[tuple[int, Completion]] = []
        while not ended:
            ended = backend.step()
        assert [key for key, _ in ended] == [0]
        backend.admit(2, CompletionParams(PROMPT, max_tokens=2), None)  # its slot is free now
    finally:
        backend.close()


def _prefill_while_streaming(path: Path, chunk: int, prompt: str) -> tuple[int, str]:
    """Admit ``prompt`` while another sequence streams, on a context reading ``chunk`` prompt
    tokens per step: how many pieces the stream got before the prompt's first token, and the
    prompt's completion."""
    backend = open_backend(_spec(path, options={"prefill_chunk": chunk}), 0)
    streamed: list[str] = []
    first: list[int] = []

    def on_long(piece: str) -> bool:
        if not first:
            first.append(len(streamed))
        return True

    try:
        backend.admit(0, CompletionParams("x", max_tokens=100), streamed.append)
        backend.step()  # reads the short prompt; it streams from now on
        at_admit = len(streamed)
        backend.admit(1, CompletionParams(prompt, max_tokens=4), on_long)
        (result,) = _run_together_after(backend, 1)
    finally:
        backend.close()
    return first[0] - at_admit, result.text


def test_a_long_prompt_is_prefilled_in_chunks_while_others_stream(
    coder: LlamaCppBackend, tiny_models: dict[str, Path]
) -> None:
    long = "value data model " * 30
    n_long = coder.count_tokens(long) + 1
    expected = coder.complete(CompletionParams(long, max_tokens=4)).text
    chunked, text = _prefill_while_streaming(tiny_models["coder-tiny"], 8, long)
    # With 8-token chunks the stream got a token in every step of the long prefill ...
    assert chunked >= n_long // 8 - 1
    assert text == expected
    # ... and with the whole prompt in one chunk, in just that one step.
    whole, text = _prefill_while_streaming(tiny_models["coder-tiny"], 256, long)
    assert whole <= 1
    assert text == expected


class _FailingDecode:
    """``llama_cpp`` as the backend sees it, except that ``llama_decode`` fails when armed."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        if self.armed:
            self.armed = False
            return 1
        return int(self._lib.llama_decode(ctx, batch))


def test_a_failed_decode_drops_every_sequence_and_the_context_goes_on(
    coder: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = [coder.complete(params).text for params in BATCH]
    lib = _FailingDecode(coder._lib)
    monkeypatch.setattr(coder, "_lib", lib)
    for i, params in enumerate(BATCH):
        coder.admit(i, params, None)
    coder.step()
    coder.step()
    lib.armed = True
    with pytest.raises(BackendError, match=r"llama_decode failed \(1\); 4 sequences dropped"):
        coder.step()
    assert coder.step() == []
    coder.cancel(0)  # already gone: ignored
    again = _run_together(coder, BATCH)
    assert [again[i].text for i in range(4)] == expected


def test_one_slot_runs_one_sequence_at_a_time_as_before(
    coder: LlamaCppBackend, tiny_models: dict[str, Path]
) -> None:
    single = open_backend(_spec(tiny_models["coder-tiny"], slots=1), 0)
    try:
        assert single.slots == 1
        for params in BATCH:
            assert single.complete(params).text == coder.complete(params).text
        single.admit(0, BATCH[0], None)
        with pytest.raises(BackendError, match="all 1 slots are taken"):
            single.admit(1, BATCH[1], None)
        (ended,) = _run_together_after(single, 0)
        assert ended.text == coder.complete(BATCH[0]).text
    finally:
        single.close()


# -- embeddings and token counting ----------------------------------------------------------


def test_embed_returns_one_unit_vector_per_text(tiny_models: dict[str, Path]) -> None:
    spec = _spec(tiny_models["embedder-tiny"], kinds=frozenset({Kind.EMBED}))
    backend = open_backend(spec, 0)
    try:
        result = backend.embed(["hello world", "def main", "hello world"])
        assert len(result.vectors) == 3
        assert {len(v) for v in result.vectors} == {backend.n_embd}
        for v in result.vectors:
            assert math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5)
        # Decoded in one batch at different positions: equal up to float rounding.
        assert np.allclose(result.vectors[0], result.vectors[2], atol=1e-6)
        assert not np.allclose(result.vectors[0], result.vectors[1], atol=1e-3)
        assert result.prompt_tokens == sum(backend.count_tokens(t) + 1 for t in ["hello world",
                                           "def main", "hello world"])  # fmt: skip
        assert backend.embed([]).vectors == []
        with pytest.raises(InvalidRequestError, match="embeddings only"):
            backend.complete(CompletionParams("hi", max_tokens=2))
    finally:
        backend.close()


def test_one_context_serves_completions_and_embeddings(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["embedder-tiny"]
    only = open_backend(_spec(path, kinds=frozenset({Kind.EMBED})), 0)
    mixed = open_backend(_spec(path, kinds=frozenset({Kind.EMBED, Kind.SIMPLE})), 0)
    try:
        before = mixed.complete(CompletionParams(PROMPT, max_tokens=8)).text
        vectors = mixed.embed(["some text", "more"]).vectors
        expected = only.embed(["some text", "more"]).vectors
        assert np.allclose(np.array(vectors), np.array(expected), atol=1e-5)
        assert mixed.complete(CompletionParams(PROMPT, max_tokens=8)).text == before
    finally:
        only.close()
        mixed.close()


def test_model_without_pooling_is_mean_pooled_here(tiny_models: dict[str, Path]) -> None:
    path, texts = tiny_models["embedder-tiny"], ["hello world the model", "x"]
    pooled = open_backend(_spec(path, kinds=frozenset({Kind.EMBED})), 0)
    unpooled = open_backend(
        _spec(path, kinds=frozenset({Kind.EMBED}), options={"pooling": "none"}), 0
    )
    try:
        assert unpooled.pooling == 0 and pooled.pooling == 1
        ours, llamas = unpooled.embed(texts).vectors, pooled.embed(texts).vectors
        assert np.allclose(np.array(ours), np.array(llamas), atol=1e-5)
    finally:
        pooled.close()
        unpooled.close()


def test_batched_embeddings_equal_one_at_a_time_and_spare_running_sequences(
    tiny_models: dict[str, Path],
) -> None:
    """Seven texts: embedded several per decode, they equal those embedded one per call; on a
    two-slot mixed context with a completion running, they go one at a time through the free
    slot, and the running sequence's KV cells are untouched."""
    path = tiny_models["embedder-tiny"]
    texts = ["hello world", "def main", "x", "the model routes each request " * 3, "a", "b c", "d"]
    only = open_backend(_spec(path, kinds=frozenset({Kind.EMBED})), 0)
    mixed = open_backend(_spec(path, kinds=frozenset({Kind.EMBED, Kind.SIMPLE}), slots=2), 0)
    try:
        one_by_one = [only.embed([t]).vectors[0] for t in texts]
        batched = only.embed(texts)  # four slots, all free: four texts per decode
        assert np.allclose(np.array(batched.vectors), np.array(one_by_one), atol=1e-5)
        assert batched.prompt_tokens == sum(only.count_tokens(t) + 1 for t in texts)
        expected = mixed.complete(CompletionParams(PROMPT, max_tokens=12)).text
        mixed.admit(0, CompletionParams(PROMPT, max_tokens=12), None)
        mixed.step()
        mixed.step()
        vectors = mixed.embed(texts).vectors
        assert np.allclose(np.array(vectors), np.array(one_by_one), atol=1e-5)
        (result,) = _run_together_after(mixed, 0)
        assert result.text == expected
        mixed.admit(1, CompletionParams(PROMPT, max_tokens=1), None)
        mixed.admit(2, CompletionParams(PROMPT, max_tokens=1), None)
        with pytest.raises(BackendError, match="no free slot"):
            mixed.embed(["x"])
    finally:
        only.close()
        mixed.close()


def test_count_tokens_uses_byte_fallback(coder: LlamaCppBackend) -> None:
    assert coder.count_tokens("") == 0
    assert coder.count_tokens("def") == 1  # "▁def" is one piece
    assert coder.count_tokens("x") == 2  # "▁" (the SentencePiece space prefix) and "x"
    assert coder.count_tokens("日本") == 1 + 6  # "▁", then no pieces: three bytes each


# -- threading, lifecycle, logging ----------------------------------------------------------


def test_second_thread_entering_gets_an_error_not_an_abort(coder: LlamaCppBackend) -> None:
    errors: list[BaseException] = []

    def meanwhile(piece: str) -> bool:
        def other() -> None:
            try:
                coder.count_tokens("def")
            except BackendError as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        return False

    coder.complete(CompletionParams(PROMPT, max_tokens=4), meanwhile)
    assert len(errors) == 1 and "two threads" in str(errors[0])
    assert coder.count_tokens("def") == 1  # the lock was released


def test_close_is_idempotent_and_later_calls_fail(tiny_models: dict[str, Path]) -> None:
    backend = open_backend(_spec(tiny_models["coder-tiny"]), 0)
    backend.close()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.complete(CompletionParams("x", max_tokens=1))


def test_llama_cpp_log_goes_to_python_logging(
    tiny_models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="zeta.backends.llama_cpp.native"):
        open_backend(_spec(tiny_models["coder-tiny"]), 0).close()
    lines = [r.getMessage() for r in caplog.records if r.name.endswith(".native")]
    assert any("llama_model_loader" in line for line in lines)
    assert all("\n" not in line and line for line in lines)


def test_nothing_reaches_stderr(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """llama.cpp prints hundreds of lines while loading; none may reach the terminal."""
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_models["coder-tiny"].read_bytes()[:-100])
    code = f"""
from zeta import ModelSpec, ModelLoadError
from zeta.backends import CompletionParams, get_backend
open_backend = get_backend("llama_cpp")
b = open_backend(ModelSpec("m", path={str(tiny_models["coder-tiny"])!r}), 0)
b.complete(CompletionParams("hello", max_tokens=4)); b.embed(["x"]); b.close()
try:
    open_backend(ModelSpec("m", path={str(bad)!r}), 0)
except ModelLoadError as exc:
    print("refused", exc)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stderr == ""
    assert "refused" in proc.stdout and "not within the file bounds" in proc.stdout


# -- bad model files ------------------------------------------------------------------------


def _bad_files(tmp: Path, good: bytes) -> dict[str, Path]:
    files = {
        "missing": (tmp / "missing.gguf", None),
        "directory": (tmp, None),
        "empty": (tmp / "empty.gguf", b""),
        "wrong magic": (tmp / "magic.gguf", b"GGML" + good[4:]),
        "header cut": (tmp / "header.gguf", good[:10]),
        "bad version": (tmp / "version.gguf", good[:4] + (99).to_bytes(4, "little") + good[8:]),
        "metadata cut": (tmp / "meta.gguf", good[:300]),
        "tensor missing": (tmp / "missing-tensor.gguf", good.replace(b"ffn_up", b"ffn_uq", 1)),
        "tensor data cut": (tmp / "data.gguf", good[: len(good) // 2]),
        "last byte cut": (tmp / "last.gguf", good[:-1]),
    }
    for path, data in files.values():
        if data is not None:
            path.write_bytes(data)
    return {name: path for name, (path, _) in files.items()}


@pytest.mark.parametrize(
    ("case", "message"),
    [("missing", "no such file"), ("directory", "is a directory"), ("empty", "empty"),
     ("wrong magic", "not a GGUF file"), ("header cut", "truncated"),
     ("bad version", "unsupported GGUF version"), ("metadata cut", "truncated or corrupt metadata"),
     ("tensor missing", "llama.cpp could not load it.*'blk.0.ffn_up.weight' not found"),
     ("tensor data cut", "not within the file bounds"),
     ("last byte cut", "not within the file bounds")],
)  # fmt: skip
def test_bad_model_file_is_a_model_load_error_naming_it(
    case: str, message: str, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = _bad_files(tmp_path, tiny_models["coder-tiny"].read_bytes())[case]
    for options in ({}, {"probe": False}):  # refused by the load probe, or by this process
        with pytest.raises(ModelLoadError, match=message) as info:
            get_backend("llama_cpp")(_spec(path, options=options), 0)
        assert info.value.path == str(path)
        assert str(path) in str(info.value)


def test_broken_llama_cpp_install_is_a_model_load_error(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from zeta.backends import llama_cpp as backend_module

    def unloadable() -> None:  # what llama-cpp-python raises when its shared library will not load
        raise RuntimeError("Failed to load shared library 'libllama.so': libcuda.so.1: not found")

    monkeypatch.setattr(backend_module, "_llama", unloadable)
    with pytest.raises(ModelLoadError, match="libcuda") as info:
        open_backend(_spec(tiny_models["coder-tiny"]), 0)
    assert info.value.path == str(tiny_models["coder-tiny"])


def _reranker(tmp_path: Path, good: Path) -> Path:
    """A copy of ``good`` whose metadata says it pools by rank, as reranker models do."""
    path = tmp_path / "rank.gguf"
    path.write_bytes(good.read_bytes())
    reader = gguf.GGUFReader(path, "r+")
    reader.fields["llama.pooling_type"].parts[-1][0] = gguf.PoolingType.RANK
    del reader
    return path


def test_reranker_model_never_reads_past_its_scores_as_a_vector(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    path = _reranker(tmp_path, tiny_models["embedder-tiny"])
    with pytest.raises(ModelLoadError, match="rank"):  # from the load probe
        open_backend(_spec(path, kinds=frozenset({Kind.EMBED})), 0)
    with pytest.raises(ModelLoadError, match="rank"):
        open_backend(_spec(path, kinds=frozenset({Kind.EMBED}), options={"probe": False}), 0)
    generator = open_backend(_spec(path, kinds=frozenset({Kind.SIMPLE})), 0)
    try:
        with pytest.raises(InvalidRequestError, match="reranker"):
            generator.embed(["hello world"])
    finally:
        generator.close()
    overridden = open_backend(
        _spec(path, kinds=frozenset({Kind.EMBED}), options={"pooling": "mean", "probe": False}), 0
    )
    try:
        (vector,) = overridden.embed(["hello world"]).vectors
        assert len(vector) == overridden.n_embd
    finally:
        overridden.close()


def test_header_check_runs_before_llama_cpp(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    assert check_model_file(tiny_models["coder-tiny"]) == tiny_models["coder-tiny"]
    with pytest.raises(ModelLoadError, match="no model file"):
        check_model_file(None)
    (tmp_path / "x.gguf").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        check_model_file(tmp_path / "x.gguf")


def test_bad_backend_options_are_config_errors(tiny_models: dict[str, Path]) -> None:
    from zeta import ConfigError

    with pytest.raises(ConfigError, match=r"options\.top_k"):
        open_backend(_spec(tiny_models["coder-tiny"], options={"top_k": "many"}), 0)
    with pytest.raises(ConfigError, match=r"options\.top_p: must be float in \[0.0, 1.0\]"):
        open_backend(_spec(tiny_models["coder-tiny"], options={"top_p": 2}), 0)
    with pytest.raises(ConfigError, match=r"options\.use_mmap"):
        open_backend(_spec(tiny_models["coder-tiny"], options={"use_mmap": 1}), 0)
    with pytest.raises(ConfigError, match="unknown pooling"):
        open_backend(_spec(tiny_models["coder-tiny"], options={"pooling": "max"}), 0)
    for key, value in (
        ("probe", "yes"), ("gguf_check", 0), ("probe_timeout_s", 0), ("prefill_chunk", 0),
        ("prefill_chunk", 2.5), ("n_batch", 0), ("flash_attn", "yes"), ("flash_attn", 1),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"options\.{key}"):
            open_backend(_spec(tiny_models["coder-tiny"], options={key: value}), 0)
    with pytest.raises(ConfigError, match=r"slots: n_ctx x slots is 4294967296 KV cells"):
        open_backend(_spec(tiny_models["coder-tiny"], n_ctx=2**24, slots=256), 0)


# -- through the scheduler ------------------------------------------------------------------


@pytest.mark.anyio
async def test_many_concurrent_requests_to_one_context_are_batched_faithfully(
    tiny_models: dict[str, Path],
) -> None:
    """Forty requests at once on one llama.cpp context of four slots: all answered, each exactly
    as if it had run alone."""
    from zeta._scheduler import Scheduler

    prompts = [f"{PROMPT} {i} " + "value " * (i % 7) for i in range(40)]
    reference = open_backend(_spec(tiny_models["coder-tiny"]), 9)
    try:
        expected = [reference.complete(CompletionParams(p, max_tokens=6)).text for p in prompts]
    finally:
        reference.close()
    results: dict[int, Any] = {}
    async with Scheduler(models=[_spec(tiny_models["coder-tiny"])], policy="dynamic") as zs:

        async def one(i: int) -> None:
            results[i] = await zs.complete(prompts[i], kind=Kind.CODE, max_tokens=6)

        async with anyio.create_task_group() as tg:
            for i in range(len(prompts)):
                tg.start_soon(one, i)
        (snap,) = zs.snapshot().models
    assert [results[i].text for i in range(len(prompts))] == expected
    assert all(r.completion_tokens == 6 and r.finish_reason == "length" for r in results.values())
    assert snap.completed >= len(prompts) and snap.failed == 0 and snap.restarts == 0
    assert snap.slots == 4 and sum(snap.steps_by_occupancy[1:]) > 0  # it did batch
    # Every prompt starts with PROMPT: most admissions found it cached in a free slot.
    assert snap.prefix_hits > 0 and snap.prefix_tokens_reused > len(PROMPT.split())


@pytest.mark.anyio
async def test_leaving_a_stream_early_frees_the_context(tiny_models: dict[str, Path]) -> None:
    from zeta import Outcome
    from zeta._scheduler import Scheduler

    spec = _spec(tiny_models["coder-tiny"])
    reference = open_backend(spec, 9)
    try:
        expected = reference.complete(CompletionParams("next one", max_tokens=8)).text
    finally:
        reference.close()
    async with Scheduler(models=[spec], policy="dynamic") as zs:
        pieces: list[str] = []
        async with zs.stream(PROMPT, kind=Kind.CODE, max_tokens=200) as stream:
            async for piece in stream:
                pieces.append(piece)
                if len(pieces) == 3:
                    break
        # The only context is free again and its cache holds nothing the next request sees.
        after = await zs.complete("next one", kind=Kind.CODE, max_tokens=8)
        requests = zs.recorder.snapshot().requests
    assert len(pieces) == 3
    assert after.text == expected and after.completion_tokens == 8
    assert requests.get(("m", "code", Outcome.CANCELLED.value)) == 1
    assert requests.get(("m", "code", Outcome.OK.value)) == 1


@pytest.mark.anyio
async def test_scheduler_refuses_to_start_on_a_bad_model_file(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    from zeta._scheduler import Scheduler

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_models["reasoner-tiny"].read_bytes()[:5000])
    models = [_spec(tiny_models["coder-tiny"], name="ok"), _spec(bad, name="broken")]
    with pytest.raises(ModelLoadError) as info:
        async with Scheduler(models=models):
            pytest.fail("started without its model")  # pragma: no cover
    assert info.value.path == str(bad)


def test_a_context_that_embeds_opens_with_any_slot_count(tiny_models: dict[str, Path]) -> None:
    """llama.cpp aborts the process building the pooling graph of a context whose sequence
    count is not a power of two; zeta rounds it up. Run in a child: a regression is an abort."""
    code = (
        "import sys\n"
        "from zeta import Kind, ModelSpec\n"
        "from zeta.backends.llama_cpp import open_backend\n"
        "for kinds in ({Kind.EMBED}, {Kind.SIMPLE, Kind.EMBED}):\n"
        "    spec = ModelSpec(name='e', path=sys.argv[1], kinds=frozenset(kinds), preferred=frozenset(kinds),\n"
        "                     n_ctx=64, slots=int(sys.argv[2]))\n"
        "    backend = open_backend(spec, 0)\n"
        "    assert len(backend.embed(['a b', 'c d e', 'f'] * 3).vectors) == 9\n"
        "    backend.close()\n"
    )
    for slots in (3, 6):
        done = subprocess.run(
            [sys.executable, "-c", code, str(tiny_models["embedder-tiny"]), str(slots)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
