"""pydantic-ai's ``Model`` interface over a zeta :class:`~zeta.Scheduler`, in-process.

An :class:`~pydantic_ai.Agent` drives a :class:`ZetaModel` like any hosted model: its messages
become zeta chat messages, its function and output tools ``tools`` and ``tool_choice``, its native
or prompted output mode a ``response_format`` with the output's JSON schema (which the grammar
enforces in both modes), and each :class:`~zeta.ChatResult` comes back as a
:class:`~pydantic_ai.messages.ModelResponse`::

    from pydantic_ai import Agent
    from zeta.integrations.pydantic_ai import ZetaModel

    async with Scheduler.from_config("zeta.toml") as zs:
        agent = Agent(ZetaModel(zs), output_type=Answer)
        result = await agent.run("...")

``tool_choice`` is pydantic-ai's own resolution (``"required"`` when the agent may not end with
text, as with a structured ``output_type`` in tool mode; ``"auto"`` otherwise), and a forced
choice is enforced by zeta with a grammar, so even a small local model answers with a valid call.
A reply that must be JSON (native or prompted output) while function tools are offered is
constrained to "a call of a function tool, or the output object": the output travels as a call
of one more tool, which comes back as the response's text.

Needs the ``pydantic-ai`` extra (``pip install 'zeta[pydantic-ai]'``); importing :mod:`zeta`
alone never imports pydantic-ai. The model is plain anyio: pydantic-ai's direct API
(:func:`pydantic_ai.direct.model_request`) runs it on asyncio and trio; pydantic-ai's ``Agent``
itself runs on asyncio only.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, assert_never, cast

try:
    from pydantic_ai import RunContext

    # Every built-in adapter splits ``<think>`` tags from text with
    # ``split_content_into_text_and_thinking``, renders a request's parts with
    # ``_sendable_request_parts`` and resolves ``tool_choice`` with ``resolve_tool_choice`` (all
    # three imported here): using them keeps this adapter's reading of a reply, of a history and
    # of ``tool_choice`` the same as theirs. They are private to pydantic-ai, so constraints.txt
    # pins the version they were read from.
    from pydantic_ai._thinking_part import split_content_into_text_and_thinking
    from pydantic_ai.exceptions import (
        ModelAPIError,
        ModelContextWindowExceededError,
        ModelNotFoundError,
        ModelOverloadedError,
        ModelRequestRejectedError,
        ModelServerError,
        ModelTimeoutError,
        ModelUnavailableError,
        UserError,
    )
    from pydantic_ai.messages import (
        CachePoint,
        CompactionPart,
        FilePart,
        FinishReason,
        ModelMessage,
        ModelRequest,
        ModelResponse,
        ModelResponsePart,
        ModelResponseStreamEvent,
        NativeToolCallPart,
        NativeToolReturnPart,
        SystemPromptPart,
        TextContent,
        TextPart,
        ThinkingPart,
        ToolCallPart,
        ToolReturnPart,
        UserContent,
        UserPromptPart,
    )
    from pydantic_ai.models import (
        Model,
        ModelRequestParameters,
        StreamedResponse,
        _sendable_request_parts,
        check_allow_model_requests,
    )
    from pydantic_ai.models._tool_choice import resolve_tool_choice
    from pydantic_ai.profiles import ModelProfile, ModelProfileSpec, merge_profile
    from pydantic_ai.settings import ModelSettingName, ModelSettings
    from pydantic_ai.tools import ToolDefinition
    from pydantic_ai.usage import RequestUsage
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "zeta.integrations.pydantic_ai needs pydantic-ai-slim 2.68 or later, "
        f"pip install 'zeta[pydantic-ai]' ({exc})"
    ) from exc

from .._exceptions import (
    BackendError,
    DeadlineExceeded,
    InvalidInputError,
    Overloaded,
    SchedulerClosed,
    TryAgainError,
    UnknownModelError,
)
from .._types import Kind, Priority

if TYPE_CHECKING:
    from .._chat import ChatResult
    from .._scheduler import Scheduler
    from .._stream import TokenStream

__all__ = ["ZetaModel", "ZetaModelSettings", "ZetaStreamedResponse", "map_messages"]

#: ``ModelResponse.provider_name`` and ``Model.system`` of every zeta response.
SYSTEM = "zeta"

_FINISH: dict[str, FinishReason | None] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_call",
    "cancelled": None,
}


class ZetaModelSettings(ModelSettings, total=False):
    """pydantic-ai model settings, plus zeta's own request options.

    Of the generic settings, ``max_tokens``, ``temperature``, ``seed``, ``stop_sequences`` and
    ``tool_choice`` are sent; a numeric ``timeout`` becomes the request's zeta ``deadline`` (so a
    request still queued when it passes never runs). ``request_timeout`` and
    ``first_event_timeout`` are pydantic-ai's own and work as for any model. ``top_p``,
    ``top_k``, the penalties, ``logit_bias``, ``parallel_tool_calls``, ``extra_headers``,
    ``extra_body``, ``max_retries``, ``service_tier`` and ``citations`` are ignored.
    """

    zeta_kind: Kind | str
    """What the request asks for (``"auto"``, ``"simple"``, ``"code"``, ``"reason"``); overrides
    the model's ``kind``."""
    zeta_model: str | None
    """Pin the request to a configured model by name; overrides the model's ``model``."""
    zeta_priority: Priority | int
    """The request's priority class."""
    zeta_deadline: float | None
    """Absolute time on :meth:`Scheduler.clock <zeta.Scheduler.clock>` by which it must finish."""
    zeta_admission_timeout: float | None
    """Seconds to wait for mailbox room when every capable model is full."""


class ZetaModel(Model):
    """A pydantic-ai model whose requests a zeta scheduler routes to its local models.

    Args:
        scheduler: a running :class:`~zeta.Scheduler`; the model only sends it requests (it
            neither starts nor closes it).
        kind: what requests ask for by default: ``"auto"`` (classified per request),
            ``"simple"``, ``"code"`` or ``"reason"``.
        model: pin every request to this configured model (``None``: routed by load).
        settings: default :class:`ZetaModelSettings` for every request.
        profile: overrides of the pydantic-ai model profile. zeta's says: tools, JSON-schema and
            JSON-object output, text input only, and that special tokens spelled in message text
            would be read as control tokens (zeta tokenizes a rendered chat template as
            llama.cpp's server does), so pydantic-ai breaks them in what users and tools wrote.

    ``model_name`` is the pinned model's name, else the kind; each response's ``model_name`` is
    the model that served it, and its ``provider_details`` hold the replica, the kind it ran as
    and zeta's timings.
    """

    # A llama.cpp chat model takes text only: pydantic-ai turns a file a tool returns into a note,
    # and refuses one in a user prompt, rather than this mapping dropping it.
    _unsupported_file_inputs = frozenset({"image", "document", "audio", "video"})

    unsupported_settings: ClassVar[frozenset[ModelSettingName]] = frozenset(
        {
            "top_p",
            "top_k",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "parallel_tool_calls",
            "extra_headers",
            "extra_body",
            "max_retries",
            "service_tier",
            "citations",
        }
    )

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        kind: Kind | str = Kind.AUTO,
        model: str | None = None,
        settings: ZetaModelSettings | None = None,
        profile: ModelProfileSpec | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._kind = kind
        self._model = model
        super().__init__(settings=settings, profile=profile)

    @property
    def model_name(self) -> str:
        """The pinned model's name, else the kind (``"auto"`` by default)."""
        return self._model if self._model is not None else str(self._kind)

    @property
    def system(self) -> str:
        return SYSTEM

    @property
    def provider(self) -> None:
        return None

    def _instance_profile_defaults(self, profile: ModelProfile) -> ModelProfile:
        # Before the user's ``profile=``, so it can override any of these.
        defaults = ModelProfile(
            supports_json_schema_output=True,
            supports_json_object_output=True,
            # zeta tokenizes control-token text a caller wrote as plain text (ControlText),
            # so pydantic-ai need not break it.
            may_tokenize_special_tokens_in_content=False,
        )
        if self._model is not None:
            spec = next((m for m in self._scheduler.models if m.name == self._model), None)
            if spec is not None:
                defaults["context_window"] = spec.n_ctx
        return merge_profile(profile, defaults)

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        check_allow_model_requests()
        model_settings, params = self.prepare_request(model_settings, model_request_parameters)
        call = self._chat_call(messages, model_settings, params)
        with _mapped_errors(self.model_name):
            result = await self._scheduler.chat(call.messages, **call.options)
        return ModelResponse(
            parts=call.parts(result),
            usage=_usage(result),
            model_name=result.model,
            provider_name=SYSTEM,
            provider_response_id=str(result.request_id),
            provider_details=_provider_details(result),
            finish_reason=_FINISH.get(result.finish_reason),
        )

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncGenerator[StreamedResponse]:
        check_allow_model_requests()
        model_settings, params = self.prepare_request(model_settings, model_request_parameters)
        call = self._chat_call(messages, model_settings, params)
        with _mapped_errors(self.model_name):
            stream = self._scheduler.chat_stream(call.messages, **call.options)
        async with stream:
            yield ZetaStreamedResponse(
                model_request_parameters=params,
                _model_name=self.model_name,
                _stream=stream,
                _call=call,
            )

    # -- request mapping ----------------------------------------------------------------------

    def _chat_call(
        self,
        messages: Sequence[ModelMessage],
        model_settings: ModelSettings | None,
        params: ModelRequestParameters,
    ) -> _ChatCall:
        """The ``chat`` call for an already prepared request."""
        instructions = [p.content for p in self._get_instruction_parts(messages, params) or ()]
        settings = cast(ZetaModelSettings, model_settings or {})
        options = self._options(settings)
        tools, choice = _tools_and_choice(settings, params)
        response_format = _response_format(params)
        output_tool: str | None = None
        if response_format is not None and tools and choice != "none":
            if choice == "auto":
                # A JSON reply constrained to the output schema could never be a call: offer
                # "a call of a tool, or the output" instead, the output as one more tool.
                output_tool = _output_tool_name(params, tools)
                tools = [*tools, _output_tool(output_tool, params, response_format)]
                choice = "required"
            response_format = None  # a forced call is JSON already; zeta takes one or the other
        if tools:
            options["tools"] = tools
        if choice is not None:
            options["tool_choice"] = choice
        if response_format is not None:
            options["response_format"] = response_format
        forced = choice == "required" or isinstance(choice, dict)
        return _ChatCall(
            messages=map_messages(messages, instructions),
            options=options,
            tool_names=frozenset(t["function"]["name"] for t in tools),
            forced=forced,
            output_tool=output_tool,
            thinking_tags=(
                None if forced or response_format else self.profile.get("thinking_tags")
            ),
        )

    def _options(self, settings: ZetaModelSettings) -> dict[str, Any]:
        options: dict[str, Any] = {"kind": settings.get("zeta_kind", self._kind)}
        model = settings.get("zeta_model", self._model)
        if model is not None:
            options["model"] = model
        for key, option in _PLAIN_OPTIONS:
            if key in settings:
                options[option] = settings[key]  # type: ignore[literal-required]
        if "stop_sequences" in settings:
            options["stop"] = list(settings["stop_sequences"])
        timeout = settings.get("timeout")
        if "deadline" not in options and isinstance(timeout, int | float):
            options["deadline"] = self._scheduler.clock() + timeout
        return options


_PLAIN_OPTIONS = (
    ("max_tokens", "max_tokens"),
    ("temperature", "temperature"),
    ("seed", "seed"),
    ("zeta_priority", "priority"),
    ("zeta_deadline", "deadline"),
    ("zeta_admission_timeout", "admission_timeout"),
)

# The start of a forced call that ``max_tokens`` cut off: the grammar writes the name first.
_PARTIAL_CALL = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True, slots=True)
class _ChatCall:
    """One ``chat`` call, and how to read its reply back into response parts."""

    messages: list[dict[str, Any]]
    options: dict[str, Any]
    tool_names: frozenset[str]
    forced: bool
    """The reply is grammar-constrained to a call of one of ``tool_names``."""
    output_tool: str | None
    """The tool standing in for native or prompted output, whose call is the response's text."""
    thinking_tags: tuple[str, str] | None
    """The tags of thinking in free text (``None`` for a constrained reply)."""

    def parts(self, result: ChatResult) -> list[ModelResponsePart]:
        """The response parts of a reply."""
        if self.forced and not result.tool_calls and result.finish_reason == "length":
            return self._cut_off_call(result.text)
        parts: list[ModelResponsePart] = []
        if result.text:
            if self.thinking_tags is not None:
                parts.extend(split_content_into_text_and_thinking(result.text, self.thinking_tags))
            else:
                parts.append(TextPart(result.text))
        parts.extend(self.call_parts(result))
        return parts

    def call_parts(self, result: ChatResult) -> Iterator[ModelResponsePart]:
        for call in result.tool_calls:
            if call.name == self.output_tool:
                yield TextPart(call.arguments)
            else:
                yield ToolCallPart(call.name, call.arguments, tool_call_id=call.id)

    def _cut_off_call(self, text: str) -> list[ModelResponsePart]:
        """A forced call that ``max_tokens`` cut off, as pydantic-ai reads a truncated one.

        zeta returns it as text; as a call with incomplete arguments (or output text that is
        incomplete JSON) it makes the agent raise ``IncompleteToolCall`` (or
        ``OutputTokenLimitExceeded``), naming ``max_tokens``, where the text would only be
        retried. Cut off before its arguments began, it is no output at all, which the agent
        reports the same way.
        """
        match = _PARTIAL_CALL.match(text)
        if match is None or match[1] not in self.tool_names or match.end() == len(text):
            return []
        arguments = text[match.end() :]
        if match[1] == self.output_tool:
            return [TextPart(arguments)]
        return [ToolCallPart(match[1], arguments, tool_call_id=f"call_{uuid.uuid4().hex[:24]}")]


def map_messages(
    messages: Sequence[ModelMessage], instructions: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """pydantic-ai messages as zeta's OpenAI-style chat messages.

    The leading system prompts and the agent's instructions become one system message (chat
    templates of small models often read only the first); later system prompts stay in place
    (an ``Agent`` has already turned them into ``<system>`` blocks of user turns, as zeta's profile
    does not claim inline system prompts). Tool returns and retries of a call become ``tool``
    messages answering its ``tool_call_id``. Thinking, native-tool and file parts of earlier
    responses are not sent back.

    Raises:
        UserError: a part pydantic-ai's ``Model.prepare_messages`` (which an ``Agent`` runs)
            should have translated, or a file in a user prompt.
    """
    chat: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, ModelRequest):
            chat.extend(_map_request(message))
        elif isinstance(message, ModelResponse):
            if (assistant := _map_response(message)) is not None:
                chat.append(assistant)
        else:
            assert_never(message)
    leading = 0
    while leading < len(chat) and chat[leading]["role"] == "system":
        leading += 1
    system = [m["content"] for m in chat[:leading]] + [i for i in instructions if i]
    head = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    return head + chat[leading:]


def _map_request(message: ModelRequest) -> Iterator[dict[str, Any]]:
    files: list[UserContent] = []
    for part in _sendable_request_parts(message.parts):
        match part:
            case SystemPromptPart():
                yield {"role": "system", "content": part.content}
            case UserPromptPart():
                yield {"role": "user", "content": _user_text(part.content)}
            case ToolReturnPart():
                # ``prepare_messages`` has turned any file the tool returned into a note.
                text, returned = part.model_response_str_and_user_content()
                files.extend(returned)
                yield {"role": "tool", "tool_call_id": part.tool_call_id, "content": text}
            case _:
                raise _unprepared(part)
    if files:  # after the tool messages, which must follow their calls directly
        yield {"role": "user", "content": _user_text(files)}


def _unprepared(part: object) -> UserError:
    return UserError(
        f"`{type(part).__name__}` cannot be sent to zeta as it is: call "
        "`model.prepare_messages(messages)` first (an `Agent` does)."
    )


def _user_text(content: str | Sequence[UserContent]) -> str:
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for item in content:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, TextContent):
            texts.append(item.content)
        elif isinstance(item, CachePoint):
            continue  # a prompt-cache marker; llama.cpp reuses prefixes by itself
        else:
            raise UserError(f"zeta's models take text only, not {type(item).__name__}")
    return "\n".join(texts)


def _map_response(message: ModelResponse) -> dict[str, Any] | None:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in message.parts:
        match part:
            case TextPart():
                texts.append(part.content)
            case ToolCallPart():
                calls.append(
                    {
                        "id": part.tool_call_id,
                        "type": "function",
                        "function": {"name": part.tool_name, "arguments": part.args_as_json_str()},
                    }
                )
            case (
                ThinkingPart()
                | NativeToolCallPart()
                | NativeToolReturnPart()
                | FilePart()
                | CompactionPart()
            ):
                continue  # another provider's artefacts: nothing a local chat template can take
            case _:
                raise _unprepared(part)
    if not texts and not calls:
        return None
    assistant: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts)}
    if calls:
        assistant["tool_calls"] = calls
    return assistant


def _tool_dict(tool: ToolDefinition) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description or "",
            "parameters": tool.parameters_json_schema,
        },
    }


def _tools_and_choice(
    settings: ModelSettings, params: ModelRequestParameters
) -> tuple[list[dict[str, Any]], str | dict[str, Any] | None]:
    """The tools offered (function tools the model may see, and output tools) and zeta's
    ``tool_choice``, from pydantic-ai's resolution of it.

    ``"required"`` (the agent may not end with text) is enforced by zeta with a grammar; when it
    leaves one tool, that tool is named. A named subset is offered alone.
    """
    defs = params.declared_tool_defs
    if not defs:
        return [], None
    choice = resolve_tool_choice(settings, params)
    if choice == "none":
        return [], "none"
    mode: str
    if isinstance(choice, tuple):
        mode, names = choice
        defs = {name: tool for name, tool in defs.items() if name in names}
    else:
        mode = choice
    tools = [_tool_dict(t) for t in defs.values()]
    if not tools:
        return [], None
    if mode == "required" and len(tools) == 1:
        return tools, {"type": "function", "function": {"name": tools[0]["function"]["name"]}}
    return tools, mode


def _response_format(params: ModelRequestParameters) -> dict[str, Any] | None:
    """The output's JSON schema, in native and in prompted mode.

    Prompted output puts the schema in the instructions (``prompted_output_template``); a local
    model can be held to it by the grammar as well, at no cost, so it is.
    """
    if params.output_mode not in ("native", "prompted"):
        return None
    output = params.output_object
    if output is None:
        return {"type": "json_object"}
    name = re.sub(r"[^A-Za-z0-9_-]", "_", output.name or "final_result")[:64]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": output.json_schema}}


def _output_tool_name(params: ModelRequestParameters, tools: Sequence[dict[str, Any]]) -> str:
    taken = {t["function"]["name"] for t in tools}
    output = params.output_object
    base = re.sub(r"[^A-Za-z0-9_-]", "_", (output.name if output else None) or "final_result")
    name, n = base[:60], 1
    while name in taken:
        n += 1
        name = f"{base[:56]}_{n}"
    return name


def _output_tool(
    name: str, params: ModelRequestParameters, response_format: dict[str, Any]
) -> dict[str, Any]:
    output = params.output_object
    schema = response_format.get("json_schema", {}).get("schema", {"type": "object"})
    description = (output.description if output else None) or "Give the final answer."
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": schema},
    }


# -- response mapping ---------------------------------------------------------------------------


def _usage(result: ChatResult) -> RequestUsage:
    return RequestUsage(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens)


def _provider_details(result: ChatResult) -> dict[str, Any]:
    return {
        "finish_reason": result.finish_reason,
        "replica": result.replica,
        "kind": str(result.kind),
        "queue_wait_s": result.queue_wait_s,
        "first_token_s": result.first_token_s,
        "service_s": result.service_s,
    }


# zeta checks that a prompt and ``max_tokens`` fit a slot with an ``InvalidRequestError`` of
# this shape (zeta/backends/llama_cpp.py); it is the provider's "context length exceeded".
_CONTEXT_EXCEEDED = re.compile(r"prompt is \d+ tokens and max_tokens \d+; model .* has a context")


@contextmanager
def _mapped_errors(model_name: str) -> Iterator[None]:
    """zeta's errors as pydantic-ai's, so its retries and ``FallbackModel`` treat them as a
    provider's; the zeta error is the ``__cause__``."""
    try:
        yield
    except ModelAPIError:
        raise
    except Overloaded as exc:
        raise ModelOverloadedError(
            model_name, str(exc), provider_error_code="Overloaded", retry_after=exc.retry_after
        ) from exc
    except DeadlineExceeded as exc:
        raise ModelTimeoutError(
            model_name, str(exc), provider_error_code="DeadlineExceeded"
        ) from exc
    except (TryAgainError, SchedulerClosed) as exc:
        code = type(exc).__name__
        raise ModelUnavailableError(model_name, str(exc), provider_error_code=code) from exc
    except UnknownModelError as exc:
        code = type(exc).__name__
        raise ModelNotFoundError(model_name, str(exc), provider_error_code=code) from exc
    except InvalidInputError as exc:
        code = type(exc).__name__
        if _CONTEXT_EXCEEDED.search(str(exc)):
            raise ModelContextWindowExceededError(
                model_name, str(exc), provider_error_code=code
            ) from exc
        raise ModelRequestRejectedError(model_name, str(exc), provider_error_code=code) from exc
    except BackendError as exc:
        raise ModelServerError(model_name, str(exc), provider_error_code="BackendError") from exc


def _now() -> datetime:
    return datetime.now(tz=UTC)


@dataclass
class ZetaStreamedResponse(StreamedResponse):
    """A zeta chat stream as pydantic-ai stream events: text deltas as the pieces arrive, then
    the tool calls, usage and finish reason from the :class:`~zeta.ChatResult` at the end.

    A forced call (``tool_choice`` ``"required"``, or native output beside function tools)
    streams nothing until it is complete.
    """

    _model_name: str
    _stream: TokenStream[ChatResult]
    _call: _ChatCall
    _timestamp: datetime = field(default_factory=_now)
    _result: ChatResult | None = field(default=None, init=False)

    async def _get_event_iterator(self) -> AsyncIterator[ModelResponseStreamEvent]:
        call = self._call
        with _mapped_errors(self._model_name):
            async for piece in self._stream:
                if call.forced:
                    continue  # a cut-off call's text, read with the result below
                for event in self._parts_manager.handle_text_delta(
                    vendor_part_id="content", content=piece, thinking_tags=call.thinking_tags
                ):
                    yield event
        result = self._result = self._stream.result
        assert result is not None, "a finished stream has its result"
        self.provider_response_id = str(result.request_id)
        self.provider_details = _provider_details(result)
        self.finish_reason = _FINISH.get(result.finish_reason)
        self._add_usage(_usage(result), reported=True, cumulative=True)
        parts = call.parts(result) if call.forced else list(call.call_parts(result))
        for i, part in enumerate(parts):
            if isinstance(part, TextPart):
                for event in self._parts_manager.handle_text_delta(
                    vendor_part_id=("output", i), content=part.content
                ):
                    yield event
            elif isinstance(part, ToolCallPart):
                yield self._parts_manager.handle_tool_call_part(
                    vendor_part_id=part.tool_call_id,
                    tool_name=part.tool_name,
                    args=cast(str, part.args),  # this module's parts carry JSON text
                    tool_call_id=part.tool_call_id,
                )

    async def close_stream(self) -> None:
        await self._stream.aclose()

    @property
    def model_name(self) -> str:
        """The model that served the request once known, else the requested model's name."""
        return self._result.model if self._result is not None else self._model_name

    @property
    def provider_name(self) -> Literal["zeta"]:
        return "zeta"

    @property
    def provider_url(self) -> None:
        return None

    @property
    def timestamp(self) -> datetime:
        return self._timestamp
