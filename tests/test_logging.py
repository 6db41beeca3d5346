"""structlog setup: opt-in configuration, JSON/console output, and prompt redaction.

The redaction tests push canary strings through every path by which request content could reach
a log line (event keys, nested values, object reprs, exception messages, chained and grouped
exceptions, positional arguments, plain stdlib records) and check the rendered output.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zeta import (
    BackendError,
    ConfigError,
    InvalidRequestError,
    Kind,
    ModelSpec,
    Outcome,
    Recorder,
)
from zeta._snapshot import ActorState
from zeta.backends import CompletionParams, simulated
from zeta.telemetry import configure_logging, get_logger, redacting
from zeta.telemetry._logging import FRAGMENT_LEN, _Scrubber

PROMPT = "CANARY-PROMPT-7f3a9 tell me the launch codes"
COMPLETION = "CANARY-COMPLETION-c41d the codes are 0000"
TEXT = "CANARY-TEXT-90be embed me"
CANARIES = ("CANARY-PROMPT", "CANARY-COMPLETION", "CANARY-TEXT", "CANARY-")

log = get_logger("zeta.tests")


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def configured(json_output: bool | None, **kw: Any) -> io.StringIO:
    stream: io.StringIO = io.StringIO() if json_output is not None else TTY()
    configure_logging(json=json_output, level="DEBUG", stream=stream, **kw)
    return stream


def assert_clean(output: str) -> None:
    for canary in CANARIES:
        assert canary not in output, f"{canary!r} leaked into:\n{output}"


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- configuration --------------------------------------------------------------------------


def test_nothing_is_configured_at_import() -> None:
    code = (
        "import logging, structlog, zeta, zeta.telemetry, zeta.telemetry._metrics\n"
        "assert not structlog.is_configured()\n"
        "[h] = logging.getLogger('zeta').handlers\n"
        "assert type(h) is logging.NullHandler, h  # the library convention, nothing more\n"
        "assert logging.getLogger().handlers == []\n"
        "zeta.telemetry.get_logger('zeta.x').info('quiet')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == out.stderr == ""


def test_warnings_are_silent_until_configured() -> None:
    """No output through logging's last-resort handler (which prints warnings to stderr)."""
    code = (
        "import logging, zeta\n"
        "from zeta.telemetry import get_logger\n"
        "get_logger('zeta.x').warning('actor_failed', model='coder')\n"
        "get_logger('zeta.x').error('actor_down', model='coder')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    get_logger('zeta.x').exception('request_failed')\n"
        "logging.getLogger('zeta.backends.x').warning('plain stdlib record')\n"
        "logging.getLogger('unrelated').warning('not zeta: the last resort prints it')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    # The control line shows the last-resort handler was live, so the silence is zeta's doing.
    assert out.stderr == "not zeta: the last resort prints it\n"


def test_an_applications_root_handler_still_sees_zeta_events() -> None:
    """The NullHandler silences nothing once the application configures logging its own way."""
    code = (
        "import logging, sys, zeta\n"
        "from zeta.telemetry import get_logger\n"
        "logging.basicConfig(stream=sys.stdout, format='%(name)s %(levelname)s %(message)s')\n"
        "get_logger('zeta.x').warning('actor_failed', model='coder', prompt='CANARY-PROMPT')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("zeta.x WARNING ") and "actor_failed" in out.stdout
    assert_clean(out.stdout)


def test_json_lines_when_not_a_terminal() -> None:
    stream = configured(True)
    log.info("thing_happened", model="coder", queue_wait_s=0.25)
    [line] = json_lines(stream)
    assert line["event"] == "thing_happened"
    assert line["model"] == "coder" and line["queue_wait_s"] == 0.25
    assert line["level"] == "info" and line["logger"] == "zeta.tests"
    assert line["timestamp"].endswith("Z")


def test_json_is_the_default_off_a_terminal_and_console_on_one() -> None:
    plain = io.StringIO()
    configure_logging(stream=plain)
    log.info("a_event", n=1)
    assert json.loads(plain.getvalue())["n"] == 1
    tty = TTY()
    configure_logging(stream=tty)
    log.info("b_event", n=2)
    out = re.sub(r"\x1b\[[0-9;]*m", "", tty.getvalue())  # colours: it is a terminal
    assert "b_event" in out and "n=2" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    assert "a_event" not in tty.getvalue()  # the first handler was replaced, not kept
    assert "b_event" not in plain.getvalue()


def test_level_filters_and_bad_level_is_a_config_error() -> None:
    stream = io.StringIO()
    configure_logging(json=True, level="warning", stream=stream)
    log.info("dropped")
    log.warning("kept")
    assert [e["event"] for e in json_lines(stream)] == ["kept"]
    with pytest.raises(ConfigError, match="log level"):
        configure_logging(level="LOUD")


def test_configure_does_not_touch_the_root_logger() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    configure_logging(json=True, stream=io.StringIO())
    assert root.handlers == before
    assert logging.getLogger("zeta").propagate is False


# --- redaction --------------------------------------------------------------------------------


def test_sensitive_keys_are_replaced_by_their_size(captured_logs: list[dict[str, Any]]) -> None:
    stream = configured(True)
    log.info(
        "request_received",
        model="coder",
        kind=Kind.CODE,
        prompt=PROMPT,
        completion=COMPLETION,
        texts=[TEXT, TEXT],
        request={"prompt": PROMPT, "max_tokens": 5, "nested": [{"text": TEXT}]},
        params=CompletionParams(prompt=PROMPT, max_tokens=7),
        note=f"user said {PROMPT}",  # the removed values are scrubbed from other strings too
        system_prompt=PROMPT,
    )
    assert_clean(stream.getvalue())
    [line] = json_lines(stream)
    assert line["model"] == "coder" and line["kind"] == "code"
    assert line["prompt"] == f"[redacted {len(PROMPT)} chars]"
    assert line["texts"] == "[redacted 2 items]"
    assert line["request"]["max_tokens"] == 5
    assert "max_tokens=7" in line["params"] and line["params"].startswith("CompletionParams(")
    assert line["note"] == "user said [redacted]"
    assert_clean(repr(captured_logs))  # what an application's own handlers would receive


def backend_call(params: CompletionParams) -> None:
    raise ValueError(f"tokenizer failed on {params.prompt!r}")


def serve(prompt: str) -> None:
    params = CompletionParams(prompt=prompt)
    try:
        backend_call(params)
    except ValueError as exc:
        raise RuntimeError(f"backend failed for {prompt[:20]}...") from exc


def run_and_log(fn: Callable[[], None], **kw: Any) -> None:
    try:
        fn()
    except BaseException:
        log.exception("request_failed", model="coder", **kw)


@pytest.mark.parametrize("json_output", [True, None], ids=["json", "console"])
def test_tracebacks_keep_frames_but_lose_request_content(json_output: bool | None) -> None:
    stream = configured(json_output)
    run_and_log(lambda: serve(PROMPT))
    out = stream.getvalue()
    assert_clean(out)
    # The traceback is still there: both exceptions, their frames, the chain.
    for part in ("RuntimeError", "ValueError", "backend_call", "serve", "tokenizer failed on",
                 "direct cause"):  # fmt: skip
        assert part in out, part


def test_exception_groups_are_scrubbed() -> None:
    stream = configured(True)

    def fail_many() -> None:
        prompt = PROMPT
        errors = [ValueError(f"bad prompt {prompt}"), KeyError(TEXT)]
        texts = [TEXT]  # e.g. an embedding batch being processed
        assert texts
        raise ExceptionGroup("several requests failed", errors)

    run_and_log(fail_many)
    assert_clean(stream.getvalue())
    assert "several requests failed" in stream.getvalue()


def test_exception_passed_as_a_value_is_scrubbed() -> None:
    stream = configured(True)
    try:
        serve(PROMPT)
    except RuntimeError as exc:
        log.warning("request_failed", error=exc, cause=exc.__cause__)
    assert_clean(stream.getvalue())
    assert "ValueError: tokenizer failed on" in json_lines(stream)[0]["cause"]


def test_redacting_scrubs_content_that_no_sensitive_name_holds() -> None:
    stream = configured(True)
    data = PROMPT  # a name redaction cannot recognise

    def opaque() -> None:
        raise OSError(f"llama_decode returned -1 for {data}")

    with redacting(data, COMPLETION):
        run_and_log(opaque)
        log.info("piece_emitted %s", COMPLETION)
        log.info(f"free-form {COMPLETION}")
    assert_clean(stream.getvalue())
    assert "llama_decode returned -1 for [redacted]" in stream.getvalue()


def test_plain_stdlib_records_on_zeta_loggers_are_scrubbed() -> None:
    stream = configured(True)
    try:
        backend_call(CompletionParams(prompt=PROMPT))
    except ValueError:
        logging.getLogger("zeta.backends.x").error("backend failed", exc_info=True)
    assert_clean(stream.getvalue())
    assert "backend failed" in stream.getvalue()


# --- fragments: any FRAGMENT_LEN+ characters of a secret, wherever they appear ------------------

# No lowercase, no brackets: the fixed text of an event (names, keys, "[redacted]", traceback
# prose) can then never contain a window of a secret, so any window found in the output leaked.
SECRET_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'\"\\\n\t-éß✓"
secrets_st = st.text(SECRET_ALPHABET, min_size=FRAGMENT_LEN, max_size=60)
other_text = st.text(SECRET_ALPHABET + "abcxyz()[]{}<>", max_size=30)


def in_reprs(text: str) -> set[str]:
    """``text`` as repr() prints it inside a longer string: with ``'`` escaped or not."""
    both_quotes = repr(text + "'\"")  # 'text\'"': repr escapes ' when " is there too
    return {repr(text)[1:-1], both_quotes[1 : -len("\\'\"'")]}


def windows_of(secret: str, *, quoted: bool = True) -> set[str]:
    """Every FRAGMENT_LEN-character run of the secret, as is and (``quoted``) inside a repr
    or a repr of a repr."""
    forms = {secret}
    if quoted:
        forms |= {q2 for q in in_reprs(secret) for q2 in {q, *in_reprs(q)}}
    return {v[i : i + FRAGMENT_LEN] for v in forms for i in range(len(v) - FRAGMENT_LEN + 1)}


def strings_in(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)


def assert_no_fragment(secret: str, output: str) -> list[dict[str, Any]]:
    """The JSON lines of ``output``, after checking no window of ``secret`` is in any value."""
    lines = [json.loads(line) for line in output.splitlines()]
    bad = windows_of(secret)
    for line in lines:
        for text in strings_in(line):
            leaked = [w for w in bad if w in text]
            assert not leaked, f"{leaked} of {secret!r} leaked into {text!r}"
    return lines


@st.composite
def quoted_fragments(draw: st.DrawFn) -> tuple[str, str]:
    """A secret, and a message quoting 8 to 14 of its characters at an arbitrary offset."""
    secret = draw(secrets_st)
    size = draw(st.integers(FRAGMENT_LEN, min(14, len(secret))))
    start = draw(st.integers(0, len(secret) - size))
    fragment = secret[start : start + size]
    quoted = repr(fragment) if draw(st.booleans()) else fragment
    # In <>: nothing (a traceback's final newline, say) is stripped next to the fragment.
    return secret, f"<{draw(other_text)}{quoted}{draw(other_text)}>"


@given(quoted_fragments())
def test_short_fragments_never_reach_a_log_line(case: tuple[str, str]) -> None:
    """Every way a fragment travels: a backend error's repr (the ``actor_failed`` line), event
    values, the event itself, an exception value and its traceback."""
    secret, message = case
    stream = configured(True)
    with redacting(secret):  # as the supervisor does around actor_failed
        log.warning("actor_failed", model="coder", error=repr(RuntimeError(message)))
        log.info("thing_happened", detail=message, nested={"why": [message]})
        log.info(message)
    prompt = secret  # a frame local named like request content; no redacting() this time
    try:
        raise BackendError(message)
    except BackendError as exc:
        log.exception("request_failed", error=exc)
    del prompt
    failed, happened, free_form, request_failed = assert_no_fragment(secret, stream.getvalue())
    # Not vacuous: each fragment was found and replaced, the text around it kept.
    assert failed["error"].startswith("RuntimeError(") and "[redacted]" in failed["error"]
    assert "[redacted]" in happened["detail"] and "[redacted]" in free_form["event"]
    assert request_failed["error"].startswith("BackendError: ")
    assert "[redacted]" in request_failed["error"]
    assert "Traceback (most recent call last)" in request_failed["exception"]
    assert "[redacted]" in request_failed["exception"]


@given(secrets_st, st.lists(st.tuples(other_text, st.integers(0, 60), st.integers(0, 60))))
def test_scrubber_removes_every_window_and_merges_spans(
    secret: str, pieces: list[tuple[str, int, int]]
) -> None:
    """Fragments of any length (overlapping, adjacent, repeated) anywhere in any text."""
    text = "".join(other + secret[a:b] for other, a, b in pieces)
    out = _Scrubber([secret])(text)
    windows = windows_of(secret, quoted=False)
    assert not [w for w in windows if w in out]
    if not any(w in text for w in windows):
        assert out == text  # nothing to find: nothing changed
    assert "[redacted][redacted]" not in out  # touching hits are one span


def test_the_twelve_characters_quoted_by_a_backend_are_redacted() -> None:
    """The reported leak: 12 characters of the prompt in the ``actor_failed`` line."""
    stream = configured(True)
    prompt = "Summarise the merger memo for ACME Corp before Friday"
    error = RuntimeError(f"llama_decode failed near: {prompt[13:25]!r}")
    with redacting(prompt):
        log.warning("actor_failed", model="coder", error=repr(error))
    [line] = json_lines(stream)
    assert line["error"] == "RuntimeError(\"llama_decode failed near: '[redacted]'\")"
    short = "8 chars!"
    assert _Scrubber([short])(f"x{short}y") == "x[redacted]y"  # a whole 8-character prompt
    assert _Scrubber(["5char"])("a 5char b") == "a [redacted] b"  # shorter ones, when whole


def test_log_prompts_opt_in_lets_content_through() -> None:
    """The control: the canary checks above would see a leak if there was one."""
    stream = configured(True, log_prompts=True)
    log.info("request_received", prompt=PROMPT)
    run_and_log(lambda: serve(PROMPT))
    out = stream.getvalue()
    assert PROMPT in out
    assert f"tokenizer failed on {PROMPT!r}"[:40] in out.replace('\\"', '"')
    assert "locals" not in out.lower()


# --- the per-request summary line ----------------------------------------------------------------


def test_summary_lines_render_with_failures_at_warning_level() -> None:
    """The ledger's ``request_finished`` line (its fields per request: test_scheduler)."""
    from zeta._ledger import Ledger

    stream = configured(True)
    ledger = Ledger(Recorder(), clock=lambda: 2.0)
    ledger.record_unrouted(42, "code", 0.25, InvalidRequestError("no such kind"))
    ledger.record_unrouted(43, "code", 0.5, RuntimeError(f"classifier choked on {PROMPT}"))
    invalid, error = json_lines(stream)
    assert invalid == invalid | {
        "event": "request_finished", "level": "info", "logger": "zeta.requests",
        "request_id": 42, "model": None, "kind": "code", "outcome": "invalid", "total_s": 1.75,
    }  # fmt: skip
    assert error["level"] == "warning" and error["outcome"] == "error"
    assert_clean(stream.getvalue())  # the line names the outcome, never the error's text


def test_the_recorder_only_counts() -> None:
    """The ledger writes the one summary line per request; the recorder never logs."""
    stream = configured(True)
    Recorder().request_finished("coder", "code", Outcome.ACTOR_DEAD)
    assert stream.getvalue() == ""


# --- canaries through a real scheduler ---------------------------------------------------------


class LeakyBackend:
    """A simulated context whose errors quote the request, as a careless backend's might.

    Prompts containing ``FAIL`` or ``SHORT`` crash it (the supervisor restarts it); those
    containing ``BAD`` make it raise a ``BackendError`` (the call failed, the context is fine).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.spec = inner.spec

    def complete(self, params: CompletionParams, on_token: Any = None) -> Any:
        if "FAIL" in params.prompt:
            raise RuntimeError(f"llama_decode failed at token 3 of {params.prompt!r}")
        if "SHORT" in params.prompt:  # 12 characters from the middle: the reported leak
            raise RuntimeError(f"llama_decode failed near: {params.prompt[SHORT_SLICE]!r}")
        if "BAD" in params.prompt:
            raise BackendError(f"cannot tokenize {params.prompt[:30]!r}")
        return self.inner.complete(params, on_token)

    def embed(self, texts: Sequence[str]) -> Any:
        if any("FAIL" in t for t in texts):
            raise ValueError(f"embedding failed for batch {list(texts)}")
        return self.inner.embed(texts)

    def count_tokens(self, text: str) -> int:
        n: int = self.inner.count_tokens(text)
        return n

    def close(self) -> None:
        self.inner.close()


SHORT_PROMPT = f"SHORT {PROMPT}"
SHORT_SLICE = slice(21, 33)  # "f3a9 tell me": no canary prefix, so checked on its own


def leaky_factory(spec: ModelSpec, replica: int) -> LeakyBackend:
    return LeakyBackend(simulated.open_backend(spec, replica))


async def all_ready(zs: Any) -> None:
    """Wait until crashed contexts come back (there is no event to wait on)."""
    with anyio.fail_after(10):
        while any(a.state is not ActorState.READY for a in zs.snapshot().models):  # noqa: ASYNC110
            await anyio.sleep(0.005)


async def canary_traffic(app_log: Any) -> None:
    """Every kind of request end, each carrying canaries, with the app logging its errors."""
    from zeta._scheduler import Scheduler
    from zeta._supervisor import Supervision

    models = [
        ModelSpec("coder", backend="simulated", kinds=frozenset({Kind.SIMPLE, Kind.CODE, Kind.REASON}),
                  options={"base_s": 0.001}),
        ModelSpec("embedder", backend="simulated", kinds=frozenset({Kind.EMBED})),
    ]  # fmt: skip
    supervision = Supervision(backoff_initial_s=0.001, max_restarts=100)
    async with Scheduler(
        models=models, backend_factory=leaky_factory, supervision=supervision,
        sample_interval=0.01,
    ) as zs:  # fmt: skip
        requests: list[Callable[[], Awaitable[Any]]] = [
            partial(zs.complete, PROMPT, kind="code", max_tokens=4),
            partial(zs.complete, PROMPT, max_tokens=4),  # auto: the classifier reads it
            partial(zs.complete, f"BAD {PROMPT}", kind="reason"),
            partial(zs.complete, f"FAIL {PROMPT}", kind="code"),
            partial(zs.complete, PROMPT, kind="no such kind"),
            partial(zs.complete, PROMPT, kind="code", deadline=zs.clock() - 1),
            partial(zs.embed, [TEXT, COMPLETION]),
            partial(zs.embed, [TEXT, f"FAIL {COMPLETION}"]),
        ]
        # Last, once the coder is back (the first crash took it down for a moment).
        later: Callable[[], Awaitable[Any]] = partial(zs.complete, SHORT_PROMPT, kind="code")
        for call in [*requests, later]:
            if call is later:
                await all_ready(zs)
            try:
                await call()
            except Exception:
                app_log.exception("request_failed")  # an application logging through zeta
        await all_ready(zs)
        async with zs.stream(PROMPT, kind="simple", max_tokens=4) as pieces:
            async for piece in pieces:
                app_log.debug("piece", piece=piece)


@pytest.mark.parametrize(
    ("anyio_backend", "json_output"),
    [("asyncio", True), ("trio", None)],
    ids=["asyncio-json", "trio-console"],
)
@pytest.mark.anyio
async def test_canaries_never_leak_through_a_real_scheduler(
    anyio_backend: str, json_output: bool | None, captured_logs: list[dict[str, Any]]
) -> None:
    stream = configured(json_output)
    await canary_traffic(get_logger("zeta.app"))
    out = stream.getvalue()
    assert_clean(out)
    assert_clean(repr(captured_logs))
    events = [e["event"] for e in captured_logs]
    # Not vacuous: the failure paths ran and were logged, tracebacks included.
    assert "actor_failed" in events and "actor_restarted" in events
    assert events.count("request_failed") >= 5
    assert "llama_decode failed at token 3 of '[redacted]'" in out
    assert "llama_decode failed near: '[redacted]'" in out
    assert SHORT_PROMPT[SHORT_SLICE] not in out and SHORT_PROMPT[SHORT_SLICE] not in repr(
        captured_logs
    )
    assert "embedding failed for batch" in out
    assert out.count("Traceback (most recent call last)") >= 5
    summaries = [e for e in captured_logs if e["event"] == "request_finished"]
    assert {e["outcome"] for e in summaries} >= {"ok", "actor_dead", "invalid", "error"}
