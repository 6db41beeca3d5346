"""`zeta serve`: real clients against a live server on 127.0.0.1.

The official ``openai`` package (sync and async: completions, chat, streaming with the usage
chunk, tool calls, structured output, embeddings, models, a 429 its own retry honours), raw HTTP
through httpx for the wire format and malformed bodies, pydantic-ai's OpenAI model over HTTP, a
load test of 200 streaming clients of which a fifth leave mid-stream, and the ASGI app in process
on asyncio and trio. Most tests run the simulated backend; the ladder tests run real llama.cpp
(``coder-tiny`` with its chat template, grammar-constrained tool calls and JSON). The server runs
on a thread of its own (``start_server``) on an ephemeral port; tests watch its scheduler through
``snapshot()`` and its recorder, which are safe to read from any thread, and hold a context busy
with a gate (a ``threading.Event`` the simulated backend waits on) instead of relying on timing.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx
import numpy as np
import openai
import pydantic
import pytest

from zeta import ConfigError, ModelSpec, Scheduler
from zeta.backends.simulated import FailurePlan
from zeta.serve import RunningServer, create_app, start_server

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("simple", "code", "reason")
SECRET = "the launch code is swordfish-7431"


def sim(name: str, kinds: Sequence[str] = TEXT, *, slots: int = 4, **options: Any) -> ModelSpec:
    return ModelSpec(name, kinds=set(kinds), slots=slots, backend="simulated", options=options)


def sim_models(**options: Any) -> list[ModelSpec]:
    return [sim("coder", **options), sim("embedder", ("embed",))]


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll (scheduler state has no change events) until ``predicate`` holds."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition never held"
        time.sleep(0.002)


def busy(zs: Scheduler) -> tuple[int, int]:
    """(requests in slots, requests queued) over every actor."""
    snap = zs.snapshot().models
    return sum(m.in_flight for m in snap), sum(m.queue_len for m in snap)


def outcomes(zs: Scheduler) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (_, _, outcome), n in zs.recorder.snapshot().requests.items():
        counts[outcome] = counts.get(outcome, 0) + n
    return counts


@contextmanager
def gate() -> Iterator[threading.Event]:
    """A closed gate that is always opened at the end, so no worker thread stays blocked."""
    g = threading.Event()
    try:
        yield g
    finally:
        g.set()


def client(server: RunningServer, **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    kw.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=server.url + "/v1", **kw)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """One server for the tests that only send requests and read responses."""
    with start_server(Scheduler(sim_models(), mailbox_capacity=256)) as s:
        yield s


# --- the openai client -----------------------------------------------------------------------


def test_models_lists_configured_models_and_aliases(server: RunningServer) -> None:
    ids = [m.id for m in client(server).models.list()]
    assert ids == ["coder", "embedder", "auto", "simple", "code", "reason", "embed"]
    assert client(server).models.retrieve("code").id == "code"
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-4")


def test_completion_and_its_stream_agree(server: RunningServer) -> None:
    c = client(server)
    done = c.completions.create(model="code", prompt="def fib(n):", max_tokens=6, seed=1)
    (choice,) = done.choices
    assert choice.finish_reason == "length" and choice.text
    assert done.model == "coder" and done.object == "text_completion"
    assert done.usage is not None and done.usage.completion_tokens == 6
    assert done.usage.total_tokens == done.usage.prompt_tokens + 6

    chunks = list(
        c.completions.create(
            model="code", prompt="def fib(n):", max_tokens=6, seed=1, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == choice.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_client_streams_and_embeds(server: RunningServer) -> None:
    c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    async with c:
        stream = await c.completions.create(model="auto", prompt="hello", max_tokens=4, stream=True)
        pieces = [ch.choices[0].text async for ch in stream]
        assert len(pieces) == 5 and pieces[-1] == ""  # four tokens, then the finish chunk
        emb = await c.embeddings.create(model="embed", input="hello")
        assert len(emb.data) == 1 and len(emb.data[0].embedding) == 8


def test_embeddings_float_and_base64_agree(server: RunningServer) -> None:
    c = client(server)
    # The client asks for base64 unless told otherwise, and decodes it.
    packed = c.embeddings.create(model="embedder", input=["alpha", "beta"])
    floats = c.embeddings.create(model="auto", input=["alpha", "beta"], encoding_format="float")
    assert [d.index for d in packed.data] == [0, 1]
    assert packed.model == floats.model == "embedder"
    assert packed.usage.prompt_tokens == floats.usage.total_tokens > 0
    for a, b in zip(packed.data, floats.data, strict=True):
        assert np.allclose(a.embedding, b.embedding, rtol=1e-6)
    assert packed.data[0].embedding != packed.data[1].embedding


def test_api_errors_reach_the_client_typed(server: RunningServer) -> None:
    c = client(server)
    with pytest.raises(openai.NotFoundError) as nf:
        c.completions.create(model="gpt-4", prompt="x")
    assert nf.value.code == "model_not_found" and nf.value.param == "model"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="auto", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        c.completions.create(model="embed", prompt="x")
    with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
        c.embeddings.create(model="code", input="x")
    with pytest.raises(openai.BadRequestError, match="'n'"):
        c.completions.create(model="auto", prompt="x", n=2)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        c.embeddings.create(model="embed", input="x", dimensions=3)


# --- chat: the openai client, tool calls, structured output ----------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
            "required": ["zone"],
        },
    },
}
ASK = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the weather in Oslo for the next three days?"},
]


class Forecast(pydantic.BaseModel):
    """What the structured-output tests ask for, and validate the reply against."""

    city: str = pydantic.Field(max_length=24)
    days: int = pydantic.Field(ge=1, le=7)
    rain: bool
    hourly: list[float] = pydantic.Field(max_length=3)


FORECAST_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "forecast", "schema": Forecast.model_json_schema(), "strict": True},
}


class GetWeather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=24)
    days: int = pydantic.Field(ge=1, le=7)


class GetTime(pydantic.BaseModel):
    zone: Literal["UTC", "CET", "PST"]


ARGUMENTS: dict[str, type[pydantic.BaseModel]] = {"get_weather": GetWeather, "get_time": GetTime}


def check_tool_calls(calls: Sequence[Any]) -> None:
    """OpenAI-style tool calls whose arguments parse and validate against the tool's schema."""
    assert calls
    assert len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        ARGUMENTS[call.function.name].model_validate_json(call.function.arguments)


def test_chat_and_its_stream_with_usage_agree(server: RunningServer) -> None:
    c = client(server)
    done = c.chat.completions.create(model="code", messages=ASK, max_tokens=6, seed=3)
    (choice,) = done.choices
    assert done.object == "chat.completion" and done.model == "coder"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 6

    chunks = list(
        c.chat.completions.create(
            model="code", messages=ASK, max_tokens=6, seed=3, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage
    assert all(ch.usage is None for ch in chunks[:-1])
    assert {ch.object for ch in chunks} == {"chat.completion.chunk"}
    assert len({ch.id for ch in chunks}) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_client_streams_a_chat(server: RunningServer) -> None:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) as c:
        stream = await c.chat.completions.create(
            model="auto", messages=ASK, max_tokens=4, stream=True
        )
        chunks = [ch async for ch in stream]
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "length"
    assert all(ch.usage is None for ch in chunks)
    # Every chunk names the model that served the request, not the alias asked for.
    assert {ch.model for ch in chunks} == {chunks[-1].model} and chunks[-1].model != "auto"


def test_chat_names_a_configured_model(server: RunningServer) -> None:
    done = client(server).chat.completions.create(model="coder", messages=ASK, max_tokens=2)
    assert done.model == "coder"
    with pytest.raises(openai.NotFoundError) as nf:
        client(server).chat.completions.create(model="gpt-4o", messages=ASK)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        client(server).chat.completions.create(model="embedder", messages=ASK)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_choice_required_returns_openai_tool_calls(
    server: RunningServer, stream: bool
) -> None:
    c = client(server)
    kw: dict[str, Any] = {"model": "code", "messages": ASK, "tools": [WEATHER, TIME]}
    if not stream:
        done = c.chat.completions.create(**kw, tool_choice="required", max_tokens=200)
        (choice,) = done.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_tool_calls(choice.message.tool_calls or [])
        return
    chunks = list(
        c.chat.completions.create(**kw, tool_choice="required", max_tokens=200, stream=True)
    )
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or []]
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)
    check_tool_calls(deltas)


def test_a_named_tool_choice_calls_that_tool(server: RunningServer) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    done = client(server).chat.completions.create(
        model="code", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=200
    )
    calls = done.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_time"]
    check_tool_calls(calls)


def test_a_tool_result_goes_back_into_the_conversation(server: RunningServer) -> None:
    """The round trip an agent makes: call, run the tool, send its result, get the answer."""
    c = client(server)
    first = c.chat.completions.create(
        model="code", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200
    )
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    history = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"rain": true}'},
    ]
    final = c.chat.completions.create(model="code", messages=history, tools=[WEATHER], max_tokens=5)
    assert final.choices[0].message.content and final.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_response_format_json_schema_parses_and_validates(
    server: RunningServer, stream: bool
) -> None:
    c = client(server)
    kw: dict[str, Any] = {"model": "code", "messages": ASK, "max_tokens": 300}
    if stream:
        chunks = c.chat.completions.create(**kw, response_format=FORECAST_FORMAT, stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    else:
        done = c.chat.completions.create(**kw, response_format=FORECAST_FORMAT)
        assert done.choices[0].finish_reason == "stop"
        text = done.choices[0].message.content or ""
    Forecast.model_validate_json(text)
    json_object = c.chat.completions.create(**kw, response_format={"type": "json_object"})
    assert isinstance(json.loads(json_object.choices[0].message.content or ""), dict)


def test_the_clients_parse_helper_reads_structured_output(server: RunningServer) -> None:
    """``client.chat.completions.parse`` (the openai package's structured-output helper) sends a
    strict json_schema built from a pydantic model, and parses the reply with it."""
    done = client(server).chat.completions.parse(
        model="code", messages=ASK, response_format=Forecast, max_tokens=300
    )
    assert isinstance(done.choices[0].message.parsed, Forecast)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "code"}, "messages"),
        ({"model": "code", "messages": []}, "messages"),
        ({"model": "code", "messages": {"role": "user"}}, "messages"),
        ({"model": "code", "messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"model": "code", "messages": [{"role": "user", "content": 5}]}, None),
        ({"model": "code", "messages": ASK, "tools": [{"type": "function"}]}, None),
        ({"model": "code", "messages": ASK, "tool_choice": "sometimes"}, None),
        ({"model": "code", "messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None),
        ({"model": "code", "messages": ASK, "response_format": {"type": "yaml"}}, None),
        ({"model": "code", "messages": ASK, "n": 3}, "n"),
        ({"model": "code", "messages": ASK, "logprobs": True}, "logprobs"),
        ({"model": "code", "messages": ASK, "functions": []}, "functions"),
        ({"model": "code", "messages": ASK, "temprature": 0.5}, "temprature"),
    ],
)  # fmt: skip
def test_malformed_chat_bodies_are_400(
    server: RunningServer, body: dict[str, Any], param: str | None
) -> None:
    error = error_of(httpx.post(server.url + "/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_ignored_openai_fields_are_accepted(server: RunningServer) -> None:
    done = client(server).chat.completions.create(
        model="code", messages=ASK, max_completion_tokens=2, top_p=0.9, presence_penalty=0.1,
        frequency_penalty=0.1, user="u1", metadata={"k": "v"}, store=False,
        parallel_tool_calls=True, n=1, logprobs=False,
    )  # fmt: skip
    assert done.usage is not None and done.usage.completion_tokens == 2


# --- raw HTTP: the wire format, malformed bodies ---------------------------------------------


def sse(body: str) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream, checking its framing."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


def test_stream_is_server_sent_events_ending_in_done(server: RunningServer) -> None:
    body = {
        "model": "simple", "prompt": "hi", "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 3 + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_a_stream_without_usage_has_no_usage_chunk(server: RunningServer) -> None:
    body = {"model": "simple", "prompt": "hi", "max_tokens": 2, "stream": True}
    events = sse(httpx.post(server.url + "/v1/completions", json=body).text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize(
    ("content", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (b'{"model": "auto", "prompt": NaN}', "invalid_json", None),
        (b'{"model": "\xff"}', "invalid_json", None),
        (b"[" * 50_000 + b"]" * 50_000, "invalid_json", None),
        (b'{"prompt": "x"}', "missing_required_parameter", "model"),
        (b'{"model": "auto"}', "missing_required_parameter", "prompt"),
        (b'{"model": 3, "prompt": "x"}', "invalid_type", "model"),
        (b'{"model": "auto", "prompt": [1, 2]}', "invalid_type", "prompt"),
        (b'{"model": "auto", "prompt": "x", "stream": "yes"}', "invalid_type", "stream"),
        (b'{"model": "auto", "prompt": "x", "max_tokens": "many"}', None, None),
        (b'{"model": "auto", "prompt": "x", "temperature": -1}', None, None),
        (b'{"model": "auto", "prompt": "x", "stop": 5}', None, None),
        (b'{"model": "auto", "prompt": "x", "frobnicate": 1}', "unknown_parameter", "frobnicate"),
        (b'{"model": "auto", "prompt": "x", "echo": true}', "unsupported_parameter", "echo"),
        (b'{"model": "auto", "prompt": ""}', None, None),
    ],
)
def test_malformed_completion_bodies_are_400(
    server: RunningServer, content: bytes, code: str | None, param: str | None
) -> None:
    r = httpx.post(server.url + "/v1/completions", content=content)
    error = error_of(r, 400)
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "embed"},
        {"model": "embed", "input": [1, 2, 3]},
        {"model": "embed", "input": [[1, 2]]},
        {"model": "embed", "input": []},
        {"model": "embed", "input": "x", "encoding_format": "int8"},
        {"model": "embed", "input": "x", "dimensions": "8"},
    ],
)
def test_malformed_embedding_bodies_are_400(server: RunningServer, body: dict[str, Any]) -> None:
    error_of(httpx.post(server.url + "/v1/embeddings", json=body), 400)


def test_null_fields_mean_absent(server: RunningServer) -> None:
    body = {"model": "auto", "prompt": "x", "max_tokens": 2, "stop": None, "user": None, "n": None}
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_unknown_paths_and_methods_answer_in_openai_shape(server: RunningServer) -> None:
    error_of(httpx.get(server.url + "/v1/nothing"), 404)
    r = httpx.get(server.url + "/v1/completions")
    assert error_of(r, 405)["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]


def test_bodies_above_the_limit_are_413() -> None:
    with start_server(Scheduler(sim_models()), max_body_bytes=1024) as s:
        big = {"model": "auto", "prompt": "x" * 2000}
        assert error_of(httpx.post(s.url + "/v1/completions", json=big), 413)
        # Chunked, without a Content-Length: counted as it is read.
        chunks = iter([b'{"model": "auto", "prompt": "', b"x" * 800, b"x" * 800, b'"}'])
        r = httpx.post(s.url + "/v1/completions", content=chunks)
        assert error_of(r, 413)["code"] == "request_too_large"
        small = {"model": "auto", "prompt": "x" * 100, "max_tokens": 1}
        assert httpx.post(s.url + "/v1/completions", json=small).status_code == 200


def test_health_ready_and_metrics(server: RunningServer) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.url + "/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    text = httpx.get(server.url + "/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    assert "zeta_actor_slots{" in text.text
    om = httpx.get(server.url + "/metrics", headers={"accept": "application/openmetrics-text"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")


# --- the API key -----------------------------------------------------------------------------


def test_api_key_guards_the_api_and_metrics_not_the_probes() -> None:
    with start_server(Scheduler(sim_models()), api_key="sk-local-1") as s:
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(s.url + path)
            assert error_of(r, 401)["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
            bad = httpx.get(s.url + path, headers={"authorization": "Bearer sk-local-2"})
            error_of(bad, 401)
            assert (
                httpx.get(s.url + path, headers={"authorization": "Basic sk-local-1"}).status_code
                == 401
            )
            ok = httpx.get(s.url + path, headers={"authorization": "Bearer sk-local-1"})
            assert ok.status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/ready").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        done = client(s, api_key="sk-local-1").completions.create(
            model="auto", prompt="x", max_tokens=1
        )
        assert done.choices[0].finish_reason == "length"


# --- overload: 429 with Retry-After, which the client's own retry honours --------------------


def test_overload_is_429_with_retry_after_headers() -> None:
    with gate() as g:
        zs = Scheduler([sim("coder", slots=1, gate=g)], mailbox_capacity=1)
        with start_server(zs) as s:
            body = {"model": "code", "prompt": "x", "max_tokens": 1}
            results: list[httpx.Response] = []
            threads = [
                threading.Thread(
                    target=lambda: results.append(httpx.post(s.url + "/v1/completions", json=body))
                )
                for _ in range(2)
            ]
            threads[0].start()
            until(lambda: busy(zs) == (1, 0))
            threads[1].start()
            until(lambda: busy(zs) == (1, 1))  # one in the slot, the mailbox full

            r = httpx.post(s.url + "/v1/completions", json=body)
            error = error_of(r, 429)
            assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
            ms = int(r.headers["retry-after-ms"])
            assert ms >= 1 and int(r.headers["retry-after"]) == max(1, -(-ms // 1000))
            # A stream is admitted before its response starts: refused with the same status.
            with pytest.raises(openai.RateLimitError) as info:
                client(s).completions.create(model="code", prompt="x", stream=True)
            assert info.value.response.headers["retry-after-ms"]

            g.set()
            for t in threads:
                t.join()
            assert [x.status_code for x in results] == [200, 200]
            assert outcomes(zs) == {"ok": 2, "overloaded": 2}


def test_the_openai_clients_retry_honours_retry_after_ms(caplog: pytest.LogCaptureFixture) -> None:
    with gate() as g:
        zs = Scheduler([sim("coder", slots=1, gate=g)], mailbox_capacity=1)
        with start_server(zs) as s:
            hold = client(s)
            threads = [
                threading.Thread(
                    target=hold.completions.create,
                    kwargs={"model": "auto", "prompt": "x", "max_tokens": 1},
                )
                for _ in range(2)
            ]
            threads[0].start()
            until(lambda: busy(zs) == (1, 0))
            threads[1].start()
            until(lambda: busy(zs) == (1, 1))

            refusals: list[httpx.Response] = []

            def on_response(response: Any) -> None:
                if response.status_code == 429:
                    refusals.append(response)
                    g.set()  # make room, and wait for it, so the retry is admitted
                    until(lambda: busy(zs) == (0, 0))

            import httpx2

            http = httpx2.Client(event_hooks={"response": [on_response]})
            retrying = client(s, max_retries=2, http_client=http)
            with caplog.at_level(logging.INFO, logger="openai._base_client"):
                done = retrying.completions.create(model="auto", prompt="x", max_tokens=1)
            assert done.choices[0].finish_reason == "length"
            (refused,) = refusals
            waits = [
                float(m.group(1))
                for m in (
                    re.search(r"Retrying request in ([0-9.]+) seconds", r.getMessage())
                    for r in caplog.records
                )
                if m
            ]
            assert waits == [pytest.approx(int(refused.headers["retry-after-ms"]) / 1000)]
            for t in threads:
                t.join()
            assert outcomes(zs) == {"ok": 3, "overloaded": 1}


# --- a client that leaves cancels its request ------------------------------------------------


def test_disconnecting_mid_stream_frees_the_slot_at_once() -> None:
    zs = Scheduler([sim("coder", per_output_token_s=0.002)])
    with start_server(zs) as s:
        body = {"model": "auto", "prompt": "x", "max_tokens": 1_000_000, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert busy(zs) == (1, 0)
        until(lambda: busy(zs) == (0, 0))
        until(lambda: outcomes(zs) == {"cancelled": 1})


@pytest.mark.anyio
async def test_disconnecting_while_waiting_cancels_the_request() -> None:
    """Non-streamed requests too: one generating in the only slot, one queued behind it."""
    zs = Scheduler([sim("coder", slots=1, per_output_token_s=0.002)])
    with start_server(zs) as s:
        async with httpx.AsyncClient(base_url=s.url) as http, anyio.create_task_group() as tg:
            body = {"model": "auto", "prompt": "x", "max_tokens": 1_000_000}
            for _ in range(2):
                tg.start_soon(functools.partial(http.post, "/v1/completions", json=body))
            with anyio.fail_after(10):
                while busy(zs) != (1, 1):  # noqa: ASYNC110
                    await anyio.sleep(0.002)
            tg.cancel_scope.cancel()
        until(lambda: busy(zs) == (0, 0))
        until(lambda: outcomes(zs) == {"cancelled": 2})


def test_an_error_after_the_stream_started_is_an_error_event() -> None:
    zs = Scheduler([sim("coder", failures=FailurePlan(script=["midstream", "midstream"]))])
    with start_server(zs) as s:
        body = {"model": "auto", "prompt": "x", "max_tokens": 5, "stream": True}
        r = httpx.post(s.url + "/v1/completions", json=body)
        assert r.status_code == 200
        events = sse(r.text)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "actor_dead" and error["type"] == "service_unavailable_error"
        with pytest.raises(openai.APIError):
            list(client(s).completions.create(model="auto", prompt="x", max_tokens=5, stream=True))


def test_a_backend_error_before_the_first_token_is_an_http_status() -> None:
    zs = Scheduler([sim("coder", failures=FailurePlan(script=["error"]))])
    with start_server(zs) as s:
        body = {"model": "auto", "prompt": "x", "max_tokens": 5, "stream": True}
        error = error_of(httpx.post(s.url + "/v1/completions", json=body), 500)
        assert error["code"] == "backend_error"


# --- the real llama.cpp ladder -----------------------------------------------------------------


class Booking(pydantic.BaseModel):
    """A schema the random-weight ladder fills within a few dozen tokens (bounded fields)."""

    city: str = pydantic.Field(max_length=12)
    nights: int = pydantic.Field(ge=1, le=9)
    breakfast: bool
    room: Literal["single", "double", "suite"]


@pytest.fixture(scope="module")
def ladder_server() -> Iterator[RunningServer]:
    """``coder-tiny`` and ``embedder-tiny`` on llama.cpp, with the ladder's chat template."""
    from zeta.testing import ladder_spec

    models = [ladder_spec("coder-tiny", slots=4, n_ctx=1024), ladder_spec("embedder-tiny")]
    with start_server(Scheduler(models)) as s:
        yield s


def test_ladder_chat_stream_tools_and_structured_output(ladder_server: RunningServer) -> None:
    c = client(ladder_server)
    assert [m.id for m in c.models.list()][:2] == ["coder-tiny", "embedder-tiny"]
    done = c.chat.completions.create(model="coder-tiny", messages=ASK, max_tokens=8)
    assert done.model == "coder-tiny" and done.usage is not None
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens > 10

    chunks = list(
        c.chat.completions.create(
            model="code", messages=ASK, max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    # Grammar-constrained: a random-weight model still calls a tool with valid arguments...
    for seed in range(3):
        called = c.chat.completions.create(
            model="code", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
            max_tokens=120, seed=seed, temperature=0.8,
        )  # fmt: skip
        assert called.choices[0].finish_reason == "tool_calls"
        check_tool_calls(called.choices[0].message.tool_calls or [])
    # ... and answers in the schema asked for.
    schema = {"type": "json_schema", "json_schema": {"name": "booking", "schema": Booking.model_json_schema()}}  # fmt: skip
    for seed in range(3):
        reply = c.chat.completions.create(
            model="code", messages=ASK, response_format=schema, max_tokens=120, seed=seed,
            temperature=0.8,
        )  # fmt: skip
        assert reply.choices[0].finish_reason == "stop"
        Booking.model_validate_json(reply.choices[0].message.content or "")

    emb = c.embeddings.create(model="embed", input=["def add(a, b):", "hello"])
    assert len(emb.data) == 2 and emb.model == "embedder-tiny"
    assert len(emb.data[0].embedding) == len(emb.data[1].embedding) > 1


def test_ladder_stream_left_mid_way_frees_its_slot(ladder_server: RunningServer) -> None:
    zs = ladder_server.scheduler
    before = outcomes(zs).get("cancelled", 0)
    body = {"model": "code", "messages": ASK, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", ladder_server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    until(lambda: busy(zs) == (0, 0))
    until(lambda: outcomes(zs).get("cancelled", 0) == before + 1)


def test_pydantic_ai_agent_over_http(ladder_server: RunningServer) -> None:
    """The README's pydantic-ai recipe: its OpenAI chat model pointed at ``zeta serve``. A
    structured output is a forced call of pydantic-ai's output tool; a streamed run asks for
    ``stream_options.include_usage`` and reads the usage chunk."""
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=ladder_server.url + "/v1", api_key="unused")
    model = OpenAIChatModel("code", provider=provider)
    booked = Agent(model, output_type=Booking, model_settings={"max_tokens": 120})
    result = booked.run_sync("Book me a room in Oslo.")
    assert isinstance(result.output, Booking) and result.usage.output_tokens > 0

    async def streamed() -> tuple[str, int]:
        agent = Agent(model, model_settings={"max_tokens": 8})
        async with agent.run_stream("Say hi") as run:
            text = "".join([t async for t in run.stream_text(delta=True)])
        return text, run.usage.output_tokens

    text, tokens = anyio.run(streamed)
    assert text and tokens == 8


# --- load: 200 streaming clients, a fifth of them leaving mid-stream ---------------------------

CLIENTS, LEAVERS = 200, 40


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_200_streaming_clients_a_fifth_leaving_each_accounted_for_once(
    captured_logs: list[dict[str, Any]],
) -> None:
    """Every request ends once in the ledger, the finished ones as ``ok`` under the ids their
    clients saw, the abandoned ones as ``cancelled``; no slot or queue entry is left behind."""
    models = [sim("coder", slots=8, per_output_token_s=0.0005), sim("coder-2", slots=8)]
    zs = Scheduler(models, mailbox_capacity=256, admission_timeout=None)
    finished: dict[str, str] = {}  # response id -> text
    left: set[str] = set()
    with start_server(zs) as s:
        c = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="k", max_retries=0, timeout=60)

        async def stay(i: int) -> None:
            stream = await c.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": f"question {i}"}],
                max_tokens=12, stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = [ch async for ch in stream]
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            finished[chunks[0].id] = text

        async def leave(i: int) -> None:
            # Asks for more than it reads: its request can only end by the client leaving.
            stream = await c.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": f"question {i}"}],
                max_tokens=1_000_000, stream=True,
            )  # fmt: skip
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    left.add(chunk.id)
                    break
            await stream.close()  # closes the connection mid-stream

        async with c, anyio.create_task_group() as tg:
            for i in range(CLIENTS):
                tg.start_soon(leave if i % (CLIENTS // LEAVERS) == 0 else stay, i)

        assert len(finished) == CLIENTS - LEAVERS and len(left) == LEAVERS
        assert all(text for text in finished.values())
        expected = {"ok": CLIENTS - LEAVERS, "cancelled": LEAVERS}
        with anyio.fail_after(30):
            while outcomes(zs) != expected or busy(zs) != (0, 0):  # noqa: ASYNC110
                await anyio.sleep(0.01)
    ends = [e for e in captured_logs if e["event"] == "request_finished"]
    ids = [e["request_id"] for e in ends]
    assert len(ids) == len(set(ids)) == CLIENTS
    by_outcome: dict[str, set[str]] = {"ok": set(), "cancelled": set()}
    for e in ends:
        by_outcome[e["outcome"]].add(f"{e['request_id']:x}")
    # A response id is "chatcmpl-" + 12 hex digits of the server's + the request id in hex: the
    # ledger's ok requests are exactly those whose clients read to the end.
    assert {i.rsplit("-", 1)[1][12:] for i in finished} == by_outcome["ok"]
    assert {i.rsplit("-", 1)[1][12:] for i in left} == by_outcome["cancelled"]


# --- prompts are never logged ----------------------------------------------------------------


def test_prompts_and_bodies_are_never_logged(
    caplog: pytest.LogCaptureFixture, captured_logs: list[dict[str, Any]]
) -> None:
    with caplog.at_level(logging.DEBUG), start_server(Scheduler(sim_models())) as s:
        http = httpx.Client(base_url=s.url)
        http.post("/v1/completions", json={"model": "auto", "prompt": SECRET, "max_tokens": 2})
        http.post("/v1/completions", json={"model": "auto", "prompt": SECRET, "stream": True})
        http.post("/v1/embeddings", json={"model": "embed", "input": [SECRET]})
        http.post("/v1/completions", json={"model": "auto", "prompt": SECRET, SECRET: 1})
        http.post("/v1/completions", content=SECRET.encode())
    ours = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert ours and captured_logs
    assert not [r for r in ours if "swordfish" in r.getMessage()]
    assert "swordfish" not in repr(captured_logs)


# --- the app in process, on asyncio and trio -------------------------------------------------


@pytest.mark.anyio
async def test_the_app_runs_on_either_event_loop() -> None:
    zs = Scheduler(sim_models())
    app = create_app(zs)
    transport = httpx.ASGITransport(app=app)
    async with zs, httpx.AsyncClient(transport=transport, base_url="http://zeta") as http:
        r = await http.post(
            "/v1/completions", json={"model": "auto", "prompt": "x", "max_tokens": 2}
        )
        assert r.json()["usage"]["completion_tokens"] == 2
        body = {"model": "auto", "prompt": "x", "max_tokens": 2, "stream": True}
        r = await http.post("/v1/completions", json=body)
        assert sse(r.text)[-1] == "[DONE]"
        r = await http.post("/v1/embeddings", json={"model": "embed", "input": ["a", "b"]})
        assert len(r.json()["data"]) == 2
        error_of(await http.post("/v1/completions", content=b"{"), 400)
    assert outcomes(zs) == {"ok": 3}


@pytest.mark.anyio
async def test_a_stopped_scheduler_is_neither_healthy_nor_ready() -> None:
    app = create_app(Scheduler(sim_models()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://zeta") as http:
        assert (await http.get("/health")).status_code == 503
        assert (await http.get("/ready")).json()["status"] == "not_ready"


def test_create_app_validates_its_arguments() -> None:
    with pytest.raises(ConfigError) as info:
        create_app(Scheduler(sim_models()), max_body_bytes=0)
    assert info.value.key == "max_body_bytes"


def test_base64_embeddings_are_little_endian_float32(server: RunningServer) -> None:
    body = {"model": "embed", "input": "x", "encoding_format": "base64"}
    packed = httpx.post(server.url + "/v1/embeddings", json=body).json()["data"][0]["embedding"]
    body["encoding_format"] = "float"
    floats = httpx.post(server.url + "/v1/embeddings", json=body).json()["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(packed), dtype="<f4").tolist() == pytest.approx(floats)


# --- the command ------------------------------------------------------------------------------


def test_zeta_serve_runs_the_example_shape_and_stops_on_sigint(tmp_path: Path) -> None:
    config = tmp_path / "zeta.toml"
    config.write_text(
        textwrap.dedent(
            """
            [serve]
            port = 0
            api_key_env = "TEST_ZETA_KEY"

            [[models]]
            name = "coder"
            backend = "simulated"
            kinds = ["simple", "code", "reason"]

            [[models]]
            name = "embedder"
            backend = "simulated"
            kinds = ["embed"]
            """
        )
    )
    env = {**os.environ, "TEST_ZETA_KEY": "sk-cli"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zeta", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        assert match, line + (proc.stderr.read() if proc.stderr else "")
        c = openai.OpenAI(base_url=match.group(1) + "/v1", api_key="sk-cli", max_retries=0)
        assert "coder" in [m.id for m in c.models.list()]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=match.group(1) + "/v1", api_key="no", max_retries=0
            ).models.list()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_zeta_serve_reports_a_taken_port(tmp_path: Path) -> None:
    config = tmp_path / "zeta.toml"
    config.write_text('[[models]]\nname = "m"\nbackend = "simulated"\n')
    with start_server(Scheduler(sim_models())) as s:
        port = s.url.rsplit(":", 1)[1]
        out = subprocess.run(
            [sys.executable, "-m", "zeta", "serve", "--config", str(config), "--port", port],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1
    assert "cannot listen on 127.0.0.1:" in out.stderr


def test_config_check_shows_where_zeta_serve_listens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from zeta.cli import main

    config = tmp_path / "zeta.toml"
    config.write_text('[serve]\nport = 8123\n\n[[models]]\nname = "m"\nbackend = "simulated"\n')
    assert main(["config", "check", str(config)]) == 0
    assert (
        "zeta serve: 127.0.0.1:8123, API key from $ZETA_API_KEY if set" in capsys.readouterr().out
    )
