"""Chat messages, chat templates and tool calls.

A chat request is validated once, at the call, into a :class:`ChatPlan` by :func:`plan_chat`:
OpenAI-style messages (``system``, ``user``, ``assistant``, ``tool``; ``developer`` is taken as
``system``), tools, ``tool_choice`` and ``response_format``. The template belongs to the model,
and the router picks the model after intake, so the backend renders the messages, with a
:class:`ChatTemplate`: the model's own ``tokenizer.chat_template`` in Jinja2's
``ImmutableSandboxedEnvironment``, or :data:`CHATML_TEMPLATE` for a model without one.

A model file is untrusted input, and so is its template (llama-cpp-python's CVE-2024-34359 came
from rendering one unsandboxed). The sandbox refuses attribute access to private and internal
attributes, calls of unsafe callables and changes to lists and dicts; on top of it, a render may
use :data:`RENDER_BUDGET_S` seconds of CPU, and no string, list or output may exceed
:data:`MAX_RENDERED_CHARS` characters. Whatever goes wrong is a :class:`~zeta.ChatTemplateError`
naming the model.

Structured output: ``response_format`` with a JSON schema, and tool calls forced by
``tool_choice="required"`` or a named tool (the schema of :func:`tool_call_schema`), become the
``json_schema`` of the backend call, which the llama.cpp backend turns into a grammar. With
``tool_choice="auto"`` the reply is free text, from which Hermes/Qwen-style
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks are read (:class:`ChatReply`).
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import jinja2
import jinja2.ext
import jinja2.filters
import jinja2.nodes
import jinja2.runtime
import jinja2.visitor
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ._exceptions import ChatTemplateError, InvalidRequestError
from ._types import Kind, shown

__all__ = [
    "CHATML_TEMPLATE",
    "MAX_RENDERED_CHARS",
    "RENDER_BUDGET_S",
    "ChatPlan",
    "ChatReply",
    "ChatResult",
    "ChatTemplate",
    "ControlText",
    "ToolCall",
    "parse_tool_calls",
    "plan_chat",
    "resolve_pointer",
    "tool_call_schema",
]

# -- limits -------------------------------------------------------------------------------------

#: The most messages in one conversation.
MAX_MESSAGES = 4096
#: The most characters of message text, tool definitions and schemas in one request.
MAX_CHAT_CHARS = 1 << 22
#: The most tools one request may offer (OpenAI's limit).
MAX_TOOLS = 128
#: The deepest nesting of a JSON schema, and of a message's JSON values.
MAX_SCHEMA_DEPTH = 32
#: The largest ``minLength``/``maxLength``/``minItems``/``maxItems`` of a schema: each unit is a
#: level of nesting in the grammar llama.cpp builds from it.
MAX_REPEAT = 1000
#: The longest chat template compiled (real ones are tens of kilobytes).
MAX_TEMPLATE_CHARS = 1 << 18
#: The longest output, string or list a template may produce while rendering.
MAX_RENDERED_CHARS = 1 << 23
#: CPU seconds one render may take (a real template takes milliseconds).
RENDER_BUDGET_S = 2.0

_ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal"})
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_TOOL_CHOICES = ("none", "auto", "required")


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of a tool in a chat reply, as OpenAI returns it.

    ``id`` is ``"call_..."``, unique within a result; ``arguments`` is the JSON text of the
    arguments object.
    """

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A finished chat reply and where and how it was served.

    ``text`` is the assistant message's content (``""`` when the reply is only tool calls);
    ``finish_reason`` is ``"stop"``, ``"length"``, ``"tool_calls"`` (``tool_calls`` were read
    from the reply) or ``"cancelled"``. Output cut by ``max_tokens`` ends ``"length"``; JSON
    asked for by ``response_format`` or a forced tool call may then be incomplete (a forced call
    that does not parse is returned as ``text``, with no ``tool_calls``). The timings are those of
    :class:`~zeta.CompletionResult`.
    """

    text: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    model: str
    replica: int
    kind: Kind
    prompt_tokens: int
    completion_tokens: int
    queue_wait_s: float
    first_token_s: float
    service_s: float
    request_id: int


# -- validation ---------------------------------------------------------------------------------


def _bad(message: str) -> NoReturn:
    raise InvalidRequestError(message)


@dataclass(frozen=True, slots=True)
class ChatPlan:
    """A validated chat request: what the backend renders and constrains, and how to read the
    reply.

    ``messages`` are normalised (content is text, a ``developer`` message is a ``system`` one, an
    assistant's tool-call arguments are objects, as chat templates expect); ``tools`` are what
    the template is given (none under ``tool_choice="none"``); ``tool_choice`` is ``"none"``,
    ``"auto"``, ``"required"`` or ``"function"`` (the one named by ``forced_tool``);
    ``json_schema`` is what the output is constrained to, if anything.
    """

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...]
    tool_names: tuple[str, ...]
    tool_choice: str
    forced_tool: str | None
    json_schema: Mapping[str, Any] | None

    @property
    def classifier_text(self) -> str:
        """What ``kind="auto"`` is classified from: the system text and the last user message."""
        system = [m["content"] for m in self.messages if m["role"] == "system"]
        user = next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
        return "\n".join([*system, user]) if system else user

    def reply(self) -> ChatReply:
        """A reader for one reply to this request."""
        return ChatReply(self)


def plan_chat(
    messages: object,
    *,
    tools: object = None,
    tool_choice: object = None,
    response_format: object = None,
) -> ChatPlan:
    """Validate a chat request's messages and options into a :class:`ChatPlan`.

    Raises:
        InvalidRequestError: naming what is wrong.
    """
    budget = [MAX_CHAT_CHARS]
    normalised = _messages(messages, budget)
    tool_list = _tools(tools, budget)
    names = tuple(t["function"]["name"] for t in tool_list)
    choice, forced = _tool_choice(tool_choice, names)
    schema = _response_format(response_format, budget)
    if choice in ("required", "function"):
        if schema is not None:
            _bad(f"tool_choice {choice!r} cannot be combined with a JSON response_format")
        schema = tool_call_schema(tool_list, forced)
    return ChatPlan(
        messages=normalised,
        tools=() if choice == "none" else tool_list,
        tool_names=names,
        tool_choice=choice,
        forced_tool=forced,
        json_schema=schema,
    )


def _spend(budget: list[int], n: int) -> None:
    budget[0] -= n
    if budget[0] < 0:
        _bad(f"the request is too large: at most {MAX_CHAT_CHARS} characters of messages and tools")


def _is_sequence(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def _string(value: object, what: str, budget: list[int]) -> str:
    if type(value) is not str:
        _bad(f"{what} must be a string, got {shown(value)}")
    _spend(budget, len(value))
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            _bad(f"{what} is not valid Unicode: a lone surrogate at index {exc.start}")
    return value


def _content(value: object, what: str, budget: list[int]) -> str:
    """A message's content as text: a string, or a list of ``{"type": "text"}`` parts."""
    if type(value) is str:
        return _string(value, what, budget)
    if not _is_sequence(value):
        _bad(f"{what} must be a string or a list of text parts, got {shown(value)}")
    assert isinstance(value, Sequence)
    texts = []
    for i, part in enumerate(value):
        if (
            not isinstance(part, Mapping)
            or part.get("type") != "text"
            or set(part)
            != {
                "type",
                "text",
            }
        ):
            kind = part.get("type") if isinstance(part, Mapping) else None
            hint = f" ({kind!r} parts are not supported)" if type(kind) is str else ""
            _bad(f"{what}[{i}] must be a text part {{'type': 'text', 'text': ...}}{hint}")
        texts.append(_string(part["text"], f"{what}[{i}].text", budget))
    return "\n".join(texts)


def _messages(messages: object, budget: list[int]) -> tuple[dict[str, Any], ...]:
    if not _is_sequence(messages):
        _bad(f"messages must be a list of messages, got {shown(messages)}")
    assert isinstance(messages, Sequence)
    if not messages:
        _bad("messages must not be empty")
    if len(messages) > MAX_MESSAGES:
        _bad(f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            _bad(f"{where} must be a mapping, got {shown(message)}")
        unknown = sorted(str(k) for k in message if k not in _MESSAGE_KEYS)
        if unknown:
            _bad(f"{where} has unknown keys {unknown}; known: {sorted(_MESSAGE_KEYS)}")
        role = message.get("role")
        if role not in _ROLES:
            _bad(f"{where}.role must be one of {list(_ROLES)}, got {shown(role)}")
        item: dict[str, Any] = {"role": "system" if role == "developer" else role}
        name = message.get("name")
        if name is not None:
            item["name"] = _string(name, f"{where}.name", budget)
        content = message.get("content")
        calls = message.get("tool_calls")
        if role == "assistant" and calls is not None:
            item["tool_calls"] = _assistant_calls(calls, f"{where}.tool_calls", budget)
            call_ids.update(c["id"] for c in item["tool_calls"])
            item["content"] = (
                "" if content is None else _content(content, f"{where}.content", budget)
            )
        else:
            if calls is not None:
                _bad(f"{where}: only assistant messages have tool_calls")
            if content is None:
                _bad(f"{where}.content is missing")
            item["content"] = _content(content, f"{where}.content", budget)
        call_id = message.get("tool_call_id")
        if role == "tool":
            if type(call_id) is not str or not call_id:
                _bad(f"{where}.tool_call_id must be the id of the tool call it answers")
            if call_id not in call_ids:
                _bad(
                    f"{where}.tool_call_id {shown(call_id)} answers no tool call of an earlier "
                    "assistant message"
                )
            item["tool_call_id"] = call_id
        elif call_id is not None:
            _bad(f"{where}: only tool messages have a tool_call_id")
        out.append(item)
    return tuple(out)


def _assistant_calls(calls: object, where: str, budget: list[int]) -> list[dict[str, Any]]:
    if not _is_sequence(calls) or not calls:
        _bad(f"{where} must be a non-empty list of tool calls")
    assert isinstance(calls, Sequence)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, Mapping) or call.get("type", "function") != "function":
            _bad(f"{at} must be {{'id': ..., 'type': 'function', 'function': {{...}}}}")
        call_id = call.get("id")
        if type(call_id) is not str or not call_id:
            _bad(f"{at}.id must be a non-empty string")
        function = call.get("function")
        if not isinstance(function, Mapping):
            _bad(f"{at}.function must be a mapping with a name and arguments")
        name = function.get("name")
        if type(name) is not str or not _TOOL_NAME.fullmatch(name):
            _bad(f"{at}.function.name must match [A-Za-z0-9_-]{{1,64}}, got {shown(name)}")
        arguments = function.get("arguments", "{}")
        if type(arguments) is str:
            _spend(budget, len(arguments))
            try:
                arguments = json.loads(arguments)
            except ValueError:
                _bad(f"{at}.function.arguments is not valid JSON")
        if not isinstance(arguments, Mapping):
            _bad(f"{at}.function.arguments must be the JSON text of an object")
        _json_value(arguments, f"{at}.function.arguments", budget)
        out.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": dict(arguments)},
            }
        )
    return out


def _json_value(value: object, where: str, budget: list[int], depth: int = 0) -> None:
    """``value`` is plain JSON (mappings with string keys, lists, strings, finite numbers)."""
    if depth > MAX_SCHEMA_DEPTH:
        _bad(f"{where} is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            _bad(f"{where} holds a non-finite number")
        return
    if isinstance(value, str):
        _string(value, where, budget)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if type(key) is not str:
                _bad(f"{where} has a key that is not a string: {shown(key)}")
            _spend(budget, len(key))
            _json_value(item, where, budget, depth + 1)
    elif _is_sequence(value):
        assert isinstance(value, Sequence)
        for item in value:
            _json_value(item, where, budget, depth + 1)
    else:
        _bad(f"{where} holds {shown(value)}, which is not JSON")


def _tools(tools: object, budget: list[int]) -> tuple[dict[str, Any], ...]:
    if tools is None:
        return ()
    if not _is_sequence(tools):
        _bad(f"tools must be a list of tools, got {shown(tools)}")
    assert isinstance(tools, Sequence)
    if len(tools) > MAX_TOOLS:
        _bad(f"at most {MAX_TOOLS} tools, got {len(tools)}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            _bad(f"{where} must be {{'type': 'function', 'function': {{'name': ...}}}}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            _bad(f"{where}.function must be a mapping")
        unknown = sorted(str(k) for k in function if k not in ("name", "description", "parameters", "strict"))  # fmt: skip
        if unknown:
            _bad(f"{where}.function has unknown keys {unknown}")
        name = function.get("name")
        if type(name) is not str or not _TOOL_NAME.fullmatch(name):
            _bad(f"{where}.function.name must match [A-Za-z0-9_-]{{1,64}}, got {shown(name)}")
        if name in seen:
            _bad(f"{where}: two tools are named {name!r}")
        seen.add(name)
        item: dict[str, Any] = {"name": name}
        description = function.get("description")
        if description is not None:
            item["description"] = _string(description, f"{where}.function.description", budget)
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        item["parameters"] = check_schema(parameters, f"{where}.function.parameters", budget)
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            _bad(f"{where}.function.strict must be true or false")
        out.append({"type": "function", "function": item})
    return tuple(out)


def _tool_choice(choice: object, names: tuple[str, ...]) -> tuple[str, str | None]:
    if choice is None:
        return ("auto" if names else "none"), None
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            _bad(f"tool_choice must be one of {list(_TOOL_CHOICES)} or a named function, got {shown(choice)}")  # fmt: skip
        if choice == "required" and not names:
            _bad("tool_choice 'required' needs tools")
        return choice, None
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(choice, Mapping) or choice.get("type") != "function" or type(name) is not str:
        _bad("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")  # fmt: skip
    if name not in names:
        _bad(f"tool_choice names {shown(name)}, which is not one of the tools {list(names)}")
    return "function", name


def _response_format(value: object, budget: list[int]) -> Mapping[str, Any] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        _bad("response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {...}}")  # fmt: skip
    assert isinstance(value, Mapping)
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        _bad("response_format.json_schema must be a mapping with a name and a schema")
    name = spec.get("name")
    if type(name) is not str or not _TOOL_NAME.fullmatch(name):
        _bad(f"response_format.json_schema.name must match [A-Za-z0-9_-]{{1,64}}, got {shown(name)}")  # fmt: skip
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        _bad("response_format.json_schema.strict must be true or false")
    schema = spec.get("schema")
    if schema is None:
        return {"type": "object"}
    return check_schema(schema, "response_format.json_schema.schema", budget)


def check_schema(schema: object, where: str, budget: list[int] | None = None) -> dict[str, Any]:
    """``schema`` as a plain dict, if it is a JSON schema zeta can constrain output to.

    Checks what a grammar is built from: types, properties and required names, items, the
    combinators, enums, local ``$ref`` pointers that resolve, and string and array length bounds
    up to :data:`MAX_REPEAT`. Keywords a grammar does not enforce (``minimum``, ``format``, ...)
    are left alone.

    Raises:
        InvalidRequestError: naming the schema and the problem.
    """
    if not isinstance(schema, Mapping):
        _bad(f"{where} must be a JSON schema object, got {shown(schema)}")
    if budget is None:
        budget = [MAX_CHAT_CHARS]
    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        _bad(f"{where} is not JSON (it holds a value JSON cannot express)")
    _spend(budget, len(text))
    plain: dict[str, Any] = json.loads(text)
    _check_node(plain, plain, where, 0)
    return plain


def _check_node(node: object, root: dict[str, Any], where: str, depth: int) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        _bad(f"{where} must be a schema object, got {shown(node)}")
    if depth > MAX_SCHEMA_DEPTH:
        _bad(f"{where} is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    kind = node.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or any(k not in _JSON_TYPES for k in kinds):
            _bad(f"{where}.type must be one of {sorted(_JSON_TYPES)}, got {shown(kind)}")
    ref = node.get("$ref")
    if ref is not None:
        if type(ref) is not str or not (ref == "#" or ref.startswith("#/")):
            _bad(f"{where}.$ref must be a local reference ('#/$defs/...'), got {shown(ref)}")
        if resolve_pointer(root, ref) is None:
            _bad(f"{where}.$ref {ref!r} does not resolve")
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        sub = node.get(key)
        if sub is not None:
            if not isinstance(sub, dict):
                _bad(f"{where}.{key} must map names to schemas")
            for name, item in sub.items():
                _check_node(item, root, f"{where}.{key}.{name}", depth + 1)
    for key in ("items", "additionalProperties", "not", "contains", "propertyNames"):
        sub = node.get(key)
        if isinstance(sub, list) and key == "items":
            for i, item in enumerate(sub):
                _check_node(item, root, f"{where}.items[{i}]", depth + 1)
        elif sub is not None:
            _check_node(sub, root, f"{where}.{key}", depth + 1)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        sub = node.get(key)
        if sub is not None:
            if not isinstance(sub, list) or not sub:
                _bad(f"{where}.{key} must be a non-empty list of schemas")
            for i, item in enumerate(sub):
                _check_node(item, root, f"{where}.{key}[{i}]", depth + 1)
    required = node.get("required")
    if required is not None and (
        not isinstance(required, list) or not all(type(r) is str for r in required)
    ):
        _bad(f"{where}.required must be a list of property names")
    enum = node.get("enum")
    if enum is not None and (not isinstance(enum, list) or not enum):
        _bad(f"{where}.enum must be a non-empty list")
    for low, high in (("minLength", "maxLength"), ("minItems", "maxItems")):
        bounds: list[int] = []
        for key in (low, high):
            value = node.get(key)
            if value is not None and (type(value) is not int or not 0 <= value <= MAX_REPEAT):
                _bad(f"{where}.{key} must be an integer in [0, {MAX_REPEAT}], got {shown(value)}")
            if value is not None:
                bounds.append(value)
        if len(bounds) == 2 and bounds[0] > bounds[1]:
            _bad(f"{where}: {low} is larger than {high}")
    pattern = node.get("pattern")
    if pattern is not None and (type(pattern) is not str or len(pattern) > 1000):
        _bad(f"{where}.pattern must be a regular expression of at most 1000 characters")


def resolve_pointer(root: Mapping[str, Any], ref: str) -> Any:
    """What the local reference ``ref`` (``"#"`` or ``"#/a/b"``) points to in ``root``, or
    ``None``."""
    node: Any = root
    for part in ref[2:].split("/") if ref != "#" else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


# -- the tool-call schema -----------------------------------------------------------------------


def tool_call_schema(tools: Sequence[Mapping[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call of tool ``name`` (any of ``tools`` if ``None``):
    ``{"name": <the tool's name>, "arguments": <an object valid for its parameters>}``.

    Each tool's parameters move under ``$defs`` (``$ref`` pointers rewritten to match, each
    definition under its own name), so tools' own definitions never clash.
    """
    defs: dict[str, Any] = {}
    branches = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        arguments = _relocate(function["parameters"], f"t{i}", defs)
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


_SUBSCHEMA = ("items", "additionalProperties", "not", "contains", "propertyNames")
_SUBSCHEMAS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties")


def _relocate(root: dict[str, Any], prefix: str, defs: dict[str, Any]) -> Any:
    """A copy of ``root`` whose local ``$ref`` pointers name entries of ``defs`` instead (the
    targets copied there as ``<prefix>_<n>``)."""
    names: dict[str, str] = {}

    def name_for(ref: str) -> str:
        if ref not in names:
            name = names[ref] = f"{prefix}_{len(names)}"
            defs[name] = {}
            defs[name] = walk(resolve_pointer(root, ref))
        return names[ref]

    def walk(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                out[key] = f"#/$defs/{name_for(value)}"
            elif key in ("$defs", "definitions"):
                continue
            elif key in _SCHEMA_MAPS and isinstance(value, dict):
                out[key] = {k: walk(v) for k, v in value.items()}
            elif key in _SUBSCHEMAS and isinstance(value, list):
                out[key] = [walk(v) for v in value]
            elif key in _SUBSCHEMA:
                out[key] = [walk(v) for v in value] if isinstance(value, list) else walk(value)
            else:
                out[key] = value
        return out

    return walk(root)


# -- rendering ----------------------------------------------------------------------------------

#: The fallback template, for a model without ``tokenizer.chat_template``: ChatML, with tools
#: rendered the Hermes/Qwen way (a ``<tools>`` block in the system turn, calls as
#: ``<tool_call>`` blocks, results as ``<tool_response>`` blocks in a user turn). The generated
#: ladder models carry it too.
CHATML_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' }}
    {{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content }}
        {%- for call in message.tool_calls or [] %}
            {%- if message.content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- '<tool_call>\\n{"name": ' + call.function.name | tojson }}
            {{- ', "arguments": ' + call.function.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""


class _RenderLimit(SecurityError):
    """A render went past the sandbox's time or size limits."""


class _Budget(threading.local):
    """The CPU-time deadline of the render in progress on this thread."""

    deadline = math.inf


#: Loops over more items than this check the time budget as they go.
_CHECKED_LOOP = 4096
#: Integer arguments of calls and filters (widths, counts) are at most this large.
_MAX_INT_ARG = 1 << 20
#: Containers visited when estimating the text a value turns into.
_MAX_VISITED = 1 << 20

# A run of digits in a format string is a field width (``"%99999999d"``, ``"{:>99999999}"``):
# refused before Python allocates it, as is a width taken from the arguments (``"%*d"``).
_HUGE_WIDTH = re.compile(r"\d{7,}|%[^a-zA-Z%]*\*|\{[^{}]*\{")


def _size(value: object) -> int:
    """Items or characters in ``value`` (0 for a scalar)."""
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0


def _text_size(value: object, limit: int = MAX_RENDERED_CHARS) -> int:
    """About how many characters ``value`` turns into as text (JSON or ``str``); counting stops
    once past ``limit``."""
    total = 0
    stack = [value]
    visited = 0
    while stack and total <= limit:
        v = stack.pop()
        visited += 1
        if visited > _MAX_VISITED:
            return limit + 1
        if isinstance(v, str | bytes):
            total += len(v) + 2
        elif isinstance(v, dict):
            total += 4 * len(v) + 2
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list | tuple | set | frozenset):
            total += 2 * len(v) + 2
            stack.extend(v)
        else:
            total += 24
    return total


def _over(size: int, what: str) -> None:
    if size > MAX_RENDERED_CHARS:
        raise _RenderLimit(f"{what} of more than {MAX_RENDERED_CHARS} characters")


class _Guard(jinja2.visitor.NodeTransformer):
    """Routes what the sandbox does not see through calls it checks: every ``for`` loop's
    iterable (so long loops check the time budget) and every ``~`` concatenation (its size)."""

    def visit_For(self, node: jinja2.nodes.For) -> jinja2.nodes.Node:
        self.generic_visit(node)
        node.iter = _global_call("zeta_iter", [node.iter])
        return node

    def visit_Concat(self, node: jinja2.nodes.Concat) -> jinja2.nodes.Node:
        self.generic_visit(node)
        return _global_call("zeta_concat", [jinja2.nodes.Tuple(node.nodes, "load")])


def _global_call(name: str, args: list[Any]) -> jinja2.nodes.Call:
    return jinja2.nodes.Call(jinja2.nodes.Name(name, "load"), args, [], None, None)


def _estimate_filter(f: Callable[..., Any], args: tuple[Any, ...], kw: Mapping[str, Any]) -> int:
    """About how long the result of filter ``f`` is, for the filters whose result can be much
    larger than their arguments; 0 for the others (their result is checked afterwards)."""
    F = jinja2.filters
    if f is F.do_indent and args and isinstance(args[0], str):
        width = args[1] if len(args) > 1 else kw.get("width", 4)
        per_line = len(width) if isinstance(width, str) else int(width)
        return len(args[0]) + (args[0].count("\n") + 1) * per_line
    if f is F.do_replace and len(args) > 3 and isinstance(args[1], str):
        return len(args[1]) + (len(args[1]) + 1) * len(str(args[3]))
    if f is F.do_format and args and isinstance(args[0], str):
        return len(args[0]) + args[0].count("%") * _text_size((args[1:], kw))
    if f in (F.do_join, _tojson, F.do_pprint, F.FILTERS["string"], F.do_list):
        return 2 * _text_size((args, kw))
    return 0


def _estimate_method(method: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> int:
    """About how long the result of calling a ``str`` method is (0 if it cannot grow much)."""
    target = getattr(method, "__wrapped__", method)
    text = getattr(target, "__self__", None)
    if not isinstance(text, str):
        return 0
    name = getattr(target, "__name__", "")
    if name == "replace" and len(args) > 1:
        return len(text) + (len(text) + 1) * len(str(args[1]))
    if name == "expandtabs":
        tab = args[0] if args else kw.get("tabsize", 8)
        return len(text) * max(1, tab if isinstance(tab, int) else 8)
    if name in ("join", "format", "format_map"):
        return len(text) * (1 + text.count("{")) + 2 * _text_size((args, kw))
    return 0


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox plus limits on time and size; an unsafe attribute is an error
    at once (the stock sandbox renders it as an empty string until it is used)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols],
            autoescape=False,
            finalize=self._finalize,
        )
        self.budget = _Budget()
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guarded(f) for name, f in self.filters.items()}
        del self.globals["lipsum"]  # paragraphs of text on request: nothing a prompt needs
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            zeta_iter=self._iterate,
            zeta_concat=self._concat_items,
        )
        # Macro bodies, block assignments and filter blocks are joined by ``concat``.
        self.concat = self._concat  # type: ignore[method-assign]

    def compile_checked(self, source: str) -> jinja2.Template:
        """``source`` compiled with :class:`_Guard`'s checks added."""
        tree = _Guard().visit(self.parse(source))
        return self.template_class.from_code(
            self, self.compile(tree), self.make_globals(None), None
        )

    def check(self, value: object = None) -> Any:
        """``value``, unless it is too large; raises once the time budget is spent."""
        if time.thread_time() > self.budget.deadline:
            raise _RenderLimit(f"rendering took more than {RENDER_BUDGET_S} s of CPU")
        _over(_size(value), "a value")
        return value

    def _check_args(self, args: Sequence[object], kwargs: Mapping[str, object]) -> None:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and abs(arg) > _MAX_INT_ARG:
                raise _RenderLimit(f"an argument of {shown(arg)}")
            _over(_size(arg), "an argument")

    def _guarded(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """Filter ``f``, with its arguments and result checked (filters bypass :meth:`call`)."""

        @functools.wraps(f)  # keeps jinja's pass_context/pass_environment markers
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.check()
            if f is jinja2.filters.do_join and len(args) > 1 and not _size(args[1]):
                args = (args[0], list(args[1]), *args[2:])  # a generator: see what it holds
            self._check_args(args, kwargs)
            _over(_estimate_filter(f, args, kwargs), "a filter's result")
            return self.check(f(*args, **kwargs))

        return guarded

    def _finalize(self, value: Any) -> Any:
        _over(_text_size(value), "an output")
        return value

    def _concat(self, parts: Any) -> str:
        parts = list(parts)
        _over(sum(map(len, parts)), "a block")
        return "".join(parts)

    def _concat_items(self, items: tuple[Any, ...]) -> str:
        parts = [str(x) for x in items]
        _over(sum(map(len, parts)), "a concatenation")
        return "".join(parts)

    def _iterate(self, iterable: Any) -> Any:
        self.check()
        if isinstance(iterable, Sequence | Mapping) and len(iterable) <= _CHECKED_LOOP:
            return iterable
        return self._iterate_checked(iterable)

    def _iterate_checked(self, iterable: Any) -> Iterator[Any]:
        for i, item in enumerate(iterable):
            if not i % _CHECKED_LOOP:
                self.check()
            yield item

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        self.check()
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                if max(left.bit_length(), 1) * right > 4096:
                    raise _RenderLimit("a power too large")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and _size(seq) * n > MAX_RENDERED_CHARS:
                    raise _RenderLimit("a repetition too large")
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > 4096:
                    raise _RenderLimit("a product too large")
        elif operator == "+":
            _over(_size(left) + _size(right), "a sum")
        elif operator == "%" and isinstance(left, str):
            if _HUGE_WIDTH.search(left):
                raise _RenderLimit("a format string with a huge field width")
            _over(len(left) + left.count("%") * _text_size(right), "a formatted string")
        return self.check(super().call_binop(context, operator, left, right))

    def call(
        __self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any
    ) -> Any:
        __self.check()
        target = getattr(__obj, "__wrapped__", __obj)
        if getattr(target, "__name__", "") == "join" and args and not _size(args[0]):
            args = (list(args[0]), *args[1:])  # a generator: see what it holds
        __self._check_args(args, kwargs)
        _over(_estimate_method(__obj, args, kwargs), "a method's result")
        return __self.check(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        return self.check(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        return self.check(super().getitem(obj, argument))

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe"
        )

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and _HUGE_WIDTH.search(value.__self__):
            raise _RenderLimit("a format string with a huge field width")
        return wrapped


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """``tojson`` as Hugging Face's templates expect it: no HTML escaping, non-ASCII kept."""
    if indent is not None and (type(indent) is not int or not 0 <= indent <= 8):
        raise _RenderLimit("tojson's indent must be an integer in [0, 8]")
    return json.dumps(
        value,
        ensure_ascii=False,
        indent=indent,
        separators=tuple(separators) if separators else None,
        sort_keys=sort_keys,
    )


def _raise_exception(message: object) -> NoReturn:
    raise jinja2.TemplateError(str(message))


def _strftime_now(fmt: object) -> str:
    return time.strftime(str(fmt)[:256])


class ChatTemplate:
    """A model's chat template, compiled on first use in the sandbox.

    Args:
        source: the template (a GGUF's ``tokenizer.chat_template``); ``None`` for
            :data:`CHATML_TEMPLATE`.
        model: the model's name, for errors.
        bos_token, eos_token: the texts of the model's special tokens, which templates may use.
        error: if given, the template cannot be used at all (it could not be read from the
            model file): every render raises :class:`~zeta.ChatTemplateError` with it.
    """

    def __init__(
        self,
        source: str | None,
        *,
        model: str,
        bos_token: str = "",
        eos_token: str = "",
        error: str | None = None,
    ) -> None:
        self.model = model
        self.fallback = source is None
        self.source = CHATML_TEMPLATE if source is None else source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._error = error
        self._template: jinja2.Template | None = None
        self._env: _Sandbox | None = None
        self._lock = threading.Lock()

    def _fail(self, reason: str) -> NoReturn:
        reason = " ".join(reason.split())
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise ChatTemplateError(
            f"the chat template of model {self.model!r} cannot render these messages: {reason}",
            model=self.model,
        )

    def _compiled(self) -> tuple[_Sandbox, jinja2.Template]:
        with self._lock:
            if self._error is None and self._template is None:
                if len(self.source) > MAX_TEMPLATE_CHARS:
                    self._error = (
                        f"it is {len(self.source)} characters long; at most "
                        f"{MAX_TEMPLATE_CHARS} are compiled"
                    )
                else:
                    env = _Sandbox()
                    try:
                        self._template = env.compile_checked(self.source)
                        self._env = env
                    except Exception as exc:  # a syntax error, or a template too deep to compile
                        self._error = f"it does not compile: {type(exc).__name__}: {exc}"
            if self._error is not None:
                self._fail(self._error)
            assert self._env is not None and self._template is not None
            return self._env, self._template

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] = (),
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text of ``messages`` (and ``tools``), ending with the assistant's turn.

        Raises:
            ChatTemplateError: the template failed, naming the model.
        """
        env, template = self._compiled()
        env.budget.deadline = time.thread_time() + RENDER_BUDGET_S
        out: list[str] = []
        size = 0
        try:
            chunks: Iterator[str] = template.generate(
                messages=list(messages),
                tools=list(tools) or None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
            for chunk in chunks:
                size += len(chunk)
                if size > MAX_RENDERED_CHARS:
                    raise _RenderLimit(f"an output of more than {MAX_RENDERED_CHARS} characters")
                env.check()
                out.append(chunk)
        except _RenderLimit as exc:
            self._fail(f"it went past the sandbox's limits: {exc}")
        except SecurityError as exc:
            self._fail(f"the sandbox refused it: {exc}")
        except jinja2.TemplateError as exc:
            what = (
                "the template raised" if type(exc) is jinja2.TemplateError else type(exc).__name__
            )
            self._fail(f"{what}: {exc}")
        except (RecursionError, MemoryError) as exc:
            self._fail(type(exc).__name__)
        except Exception as exc:  # anything a template's expressions raise
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            env.budget.deadline = math.inf
        return "".join(out)


# -- control tokens in message text --------------------------------------------------------------

#: A placeholder's delimiters: private-use characters, which no template or tokenizer treats
#: specially.
_SHIELD_OPEN, _SHIELD_CLOSE = "\ue000", "\ue001"
_SHIELD = re.compile(f"{_SHIELD_OPEN}(\\d+){_SHIELD_CLOSE}")


class ControlText:
    """Finds a model's control-token texts (``<|im_start|>``, ``<|eot_id|>``, ...) in what the
    caller wrote, so that a message cannot forge a turn.

    The rendered prompt is tokenized with special tokens parsed (the template's turn markers
    must become control tokens), so :meth:`shield` first replaces every control text in the
    messages and tools with a numbered placeholder; after rendering, :meth:`pieces` splits the
    prompt at the placeholders, and the backend tokenizes each original text as plain text.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        texts = sorted({t for t in texts if t}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, texts))) if texts else None

    def shield(self, data: Any) -> tuple[Any, list[str]]:
        """``data`` (messages or tools) with control texts replaced by placeholders, and the
        texts replaced, by placeholder number (empty: nothing to shield, ``data`` itself)."""
        pattern = self._pattern
        found: list[str] = []
        if pattern is None:
            return data, found

        def replace(match: re.Match[str]) -> str:
            found.append(match.group(0))
            return f"{_SHIELD_OPEN}{len(found) - 1}{_SHIELD_CLOSE}"

        def walk(value: Any) -> Any:
            if isinstance(value, str):
                return pattern.sub(replace, value) if pattern.search(value) else value
            if isinstance(value, Mapping):
                return {walk(k): walk(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return type(value)(walk(v) for v in value)
            return value

        shielded = walk(data)
        return (shielded, found) if found else (data, found)

    @staticmethod
    def pieces(text: str, found: Sequence[str]) -> list[tuple[str, bool]]:
        """``text`` split at placeholders: ``(piece, is_template_text)``; each placeholder is
        replaced by the control text it stands for, marked as caller's text."""
        out: list[tuple[str, bool]] = []
        pos = 0
        for match in _SHIELD.finditer(text):
            index = int(match.group(1))
            if index >= len(found):
                continue
            out.append((text[pos : match.start()], True))
            out.append((found[index], False))
            pos = match.end()
        out.append((text[pos:], True))
        return [(piece, special) for piece, special in out if piece]


# -- reading the reply --------------------------------------------------------------------------

_OPEN = "<tool_call>"
_CLOSE = "</tool_call>"
_decoder = json.JSONDecoder()


class _Completed(Protocol):
    """What :meth:`ChatReply.finish` reads of a finished completion
    (:class:`~zeta.CompletionResult`)."""

    @property
    def text(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def replica(self) -> int: ...
    @property
    def kind(self) -> Kind: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def queue_wait_s(self) -> float: ...
    @property
    def first_token_s(self) -> float: ...
    @property
    def service_s(self) -> float: ...
    @property
    def request_id(self) -> int: ...


def _call(value: object, names: Sequence[str]) -> ToolCall | None:
    """A :class:`ToolCall` from a parsed ``{"name": ..., "arguments": {...}}``, if it is one of
    a tool in ``names``."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if type(name) is not str or name not in names or not isinstance(arguments, dict):
        return None
    text = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=text)


def parse_tool_calls(text: str, names: Sequence[str]) -> tuple[str, tuple[ToolCall, ...]]:
    """The ``<tool_call>{...}</tool_call>`` blocks in ``text`` that call a tool in ``names``, and
    the text around them (stripped when there are calls).

    A block whose JSON does not parse, or that names no such tool, stays in the text; a final
    block may lack its closing tag (a model may end the reply right after the JSON).
    """
    calls: list[ToolCall] = []
    rest: list[str] = []
    pos = 0
    while (start := text.find(_OPEN, pos)) >= 0:
        at = start + len(_OPEN)
        while at < len(text) and text[at].isspace():
            at += 1
        try:
            value, end = _decoder.raw_decode(text, at)
        except ValueError:
            value, end = None, at
        call = _call(value, names)
        if call is None:
            rest.append(text[pos:at])
            pos = at
            continue
        while end < len(text) and text[end].isspace():
            end += 1
        if text.startswith(_CLOSE, end):
            end += len(_CLOSE)
        elif end < len(text):  # something else follows the JSON: not a well-formed block
            rest.append(text[pos:at])
            pos = at
            continue
        calls.append(call)
        rest.append(text[pos:start])
        pos = end
    rest.append(text[pos:])
    if not calls:
        return text, ()
    return "".join(rest).strip(), tuple(calls)


class ChatReply:
    """Reads one reply to a :class:`ChatPlan`: the content pieces to stream as they come, then
    the :class:`ChatResult`.

    A forced tool call (``tool_choice`` ``"required"`` or a named tool) is not content, so none
    of it is streamed; under ``"auto"``, streaming stops where a ``<tool_call>`` block begins
    (text that may be the start of one is held back until it is known not to be).
    """

    def __init__(self, plan: ChatPlan) -> None:
        self.plan = plan
        self._forced = plan.tool_choice in ("required", "function")
        self._watch = plan.tool_choice == "auto" and bool(plan.tool_names)
        self._pending = ""
        self._stopped = False
        self._streamed = 0
        #: Text still to stream after the result is known (what was held back and is content).
        self.tail = ""

    def feed(self, piece: str) -> str:
        """The part of a newly generated ``piece`` to stream now."""
        if self._forced or self._stopped:
            return ""
        if self._watch:
            text = self._pending + piece
            start = text.find(_OPEN)
            if start >= 0:
                self._stopped = True
                piece, self._pending = text[:start], ""
            else:
                keep = _partial_suffix(text, _OPEN)
                piece, self._pending = text[: len(text) - keep], text[len(text) - keep :]
        self._streamed += len(piece)
        return piece

    def finish(self, completed: _Completed) -> ChatResult:
        """The :class:`ChatResult` of the finished completion; sets :attr:`tail`."""
        text = completed.text
        calls: tuple[ToolCall, ...] = ()
        names = self.plan.tool_names
        if self._forced:
            try:
                call = _call(json.loads(text), names)
            except ValueError:
                call = None
            if call is not None:
                text, calls = "", (call,)
        elif self._watch:
            text, calls = parse_tool_calls(text, names)
        streamed = completed.text[: self._streamed]
        if not calls:
            self.tail = completed.text[self._streamed :]
        else:  # the text around the calls, past what was streamed before the first one
            self.tail = text[len(streamed) :] if text.startswith(streamed) else ""
        return ChatResult(
            text=text,
            tool_calls=calls,
            finish_reason="tool_calls" if calls else completed.finish_reason,
            model=completed.model,
            replica=completed.replica,
            kind=completed.kind,
            prompt_tokens=completed.prompt_tokens,
            completion_tokens=completed.completion_tokens,
            queue_wait_s=completed.queue_wait_s,
            first_token_s=completed.first_token_s,
            service_s=completed.service_s,
            request_id=completed.request_id,
        )


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
