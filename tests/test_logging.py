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
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import anyio
import pytest

from zeta import BackendError, ConfigError, Kind, ModelSpec
from zeta._snapshot import ActorState
from zeta.backends import CompletionParams, simulated
from zeta.telemetry import Outcome, Recorder, configure_logging, get_logger, redacting

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
        "assert logging.getLogger('zeta').handlers == []\n"
        "assert logging.getLogger().handlers == []\n"
        "zeta.telemetry.get_logger('zeta.x').info('quiet')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == out.stderr == ""


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


def test_recorder_logs_one_summary_line_per_request() -> None:
    stream = configured(True)
    rec = Recorder(log_requests=True)
    rec.request_finished(
        "reasoner", Kind.CODE, Outcome.OK, queue_wait_s=0.5, service_s=1.25, total_s=1.75,
        request_id=42, spilled_from="coder",
    )  # fmt: skip
    rec.request_finished("coder", "code", Outcome.ACTOR_DEAD, queue_wait_s=0.1, request_id=43)
    ok, dead = json_lines(stream)
    assert ok == ok | {
        "event": "request_finished", "level": "info", "logger": "zeta.requests",
        "request_id": 42, "model": "reasoner", "kind": "code", "outcome": "ok",
        "queue_wait_s": 0.5, "service_s": 1.25, "total_s": 1.75, "spilled_from": "coder",
    }  # fmt: skip
    assert dead["level"] == "warning" and dead["outcome"] == "actor_dead"


def test_recorder_summary_lines_are_off_by_default() -> None:
    """The scheduler logs its own summary line; the recorder's would be a duplicate."""
    stream = configured(True)
    Recorder().request_finished("coder", "code", Outcome.OK)
    assert stream.getvalue() == ""


# --- canaries through a real scheduler ---------------------------------------------------------


class LeakyBackend:
    """A simulated context whose errors quote the request, as a careless backend's might.

    Prompts containing ``FAIL`` crash it (the supervisor restarts it); those containing ``BAD``
    make it raise a ``BackendError`` (the call failed, the context is fine).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.spec = inner.spec

    def complete(self, params: CompletionParams, on_token: Any = None) -> Any:
        if "FAIL" in params.prompt:
            raise RuntimeError(f"llama_decode failed at token 3 of {params.prompt!r}")
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


def leaky_factory(spec: ModelSpec, replica: int) -> LeakyBackend:
    return LeakyBackend(simulated.open_backend(spec, replica))


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
        for call in requests:
            try:
                await call()
            except Exception:
                app_log.exception("request_failed")  # an application logging through zeta
        with anyio.fail_after(10):  # both crashed contexts come back (no event to wait on)
            while any(a.state is not ActorState.READY for a in zs.snapshot().models):  # noqa: ASYNC110
                await anyio.sleep(0.005)
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
    assert "embedding failed for batch" in out
    assert out.count("Traceback (most recent call last)") >= 5
    summaries = [e for e in captured_logs if e["event"] == "request_finished"]
    assert {e["outcome"] for e in summaries} >= {"ok", "actor_dead", "invalid", "error"}
