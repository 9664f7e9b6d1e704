"""OpenAI's Responses API (POST /v1/responses) as the chat request it amounts to. Pure.

`instructions` becomes a system message, `input` (text, or items: messages, earlier function calls
and their outputs) the messages, `max_output_tokens` max_completion_tokens, `text.format`
response_format, function `tools` chat tools; the sampling fields chat takes pass through. The input
follows the conversation it continues (`previous_response_id`: the caller looks it up,
services.router.responses_store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.router.params import get_bool, get_dict, get_int, get_str, value_error
from services.runtime.errors import ApiError

ROLES = frozenset({"user", "system", "developer", "assistant"})
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
# Chat fields a Responses request may carry as they are (OpenAI's, and vLLM's extras)
PASSED = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "ignore_eos", "repetition_penalty",
          "logit_bias", "skip_special_tokens", "include_stop_str_in_output", "parallel_tool_calls", "stream",
          "cache_salt")
# Fields this server does not serve, with the value that asks for nothing
UNSERVED = {"background": False, "prompt": None, "conversation": None, "truncation": "disabled"}
LOGPROBS = "message.output_text.logprobs"  # the one `include` served


@dataclass(frozen=True, slots=True)
class ResponseEcho:
    """What the response object repeats of the request."""

    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list = field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text_format: dict = field(default_factory=lambda: {"type": "text"})
    reasoning: dict | None = None
    metadata: dict = field(default_factory=dict)
    user: str | None = None
    previous_response_id: str | None = None
    store: bool = False  # whether the response is kept (the request's `store`, if the router keeps any)


def chat_body(body: dict, history: tuple[dict, ...] = (), can_store: bool = False
              ) -> tuple[dict, ResponseEcho, list[dict]]:
    """A Responses request body -> (the chat request body it amounts to, what the response echoes,
    the conversation so far as chat messages: history, the previous response's, then the input;
    without the instructions). can_store: the router keeps responses."""
    for name, neutral in UNSERVED.items():
        if body.get(name) not in (None, neutral):
            raise ApiError(f"'{name}' is not supported by this server", code="unsupported_parameter", param=name)
    instructions = get_str(body, "instructions")
    conversation = [*history, *_input_messages(body.get("input"))]
    messages = [{"role": "system", "content": instructions}] if instructions else []
    chat: dict = {"messages": messages + conversation, **{k: body[k] for k in PASSED if body.get(k) is not None}}
    max_output = get_int(body, "max_output_tokens", minimum=1)
    if max_output is not None:
        chat["max_completion_tokens"] = max_output
    text = get_dict(body, "text") or {}
    fmt = get_dict(text, "format")
    if fmt is not None:
        chat["response_format"] = _response_format(fmt)
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
        chat["tool_choice"] = _tool_choice(body.get("tool_choice", "auto"))
    include = body.get("include") or []
    if not isinstance(include, list) or any(x != LOGPROBS for x in include):
        raise value_error("include", f"'include' may only hold {LOGPROBS!r}")
    if include:  # the answer's tokens' logprobs, with top_logprobs alternatives each
        chat.update(logprobs=True, top_logprobs=get_int(body, "top_logprobs", 0, minimum=0))
    reasoning = get_dict(body, "reasoning")
    if reasoning is not None and reasoning.get("effort") is not None:
        chat["chat_template_kwargs"] = {"reasoning_effort": reasoning["effort"]}  # as vLLM: for templates that read it
    metadata = get_dict(body, "metadata") or {}
    echo = ResponseEcho(instructions=instructions, max_output_tokens=max_output,
                        temperature=body.get("temperature"), top_p=body.get("top_p"), tools=body.get("tools") or [],
                        tool_choice=body.get("tool_choice", "auto"),
                        parallel_tool_calls=get_bool(body, "parallel_tool_calls", True),
                        text_format=fmt or {"type": "text"}, reasoning=reasoning, metadata=metadata,
                        user=get_str(body, "user"), previous_response_id=get_str(body, "previous_response_id"),
                        store=get_bool(body, "store", True) and can_store)
    return chat, echo, conversation


def _input_messages(value: Any) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ApiError("'input' must be a string or a non-empty list of items", code="invalid_type", param="input")
    messages: list[dict] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(f"'{param}' must be an object", code="invalid_type", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ROLES:
                raise value_error(f"{param}.role", f"'{param}.role' must be one of {sorted(ROLES)}, "
                                                   f"got {item.get('role')!r}")
            messages.append({"role": item["role"], "content": _text(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", param), "type": "function",
                    "function": {"name": _field(item, "name", param), "arguments": _field(item, "arguments", param)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)  # calls made together
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", param),
                             "content": _text(item.get("output"), f"{param}.output")})
        elif kind != "reasoning":  # an earlier answer's reasoning: chat templates leave it out
            raise value_error(f"{param}.type", f"'{param}.type' {kind!r} is not supported: use 'message', "
                                               "'function_call' or 'function_call_output'")
    return messages


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(f"'{param}' must be a string or a list of text parts ({sorted(TEXT_PARTS)})",
                   code="invalid_type", param=param)


def _field(item: dict, name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise ApiError(f"'{param}.{name}' must be a string", code="invalid_type", param=f"{param}.{name}")
    return value


def _response_format(fmt: dict) -> dict:
    """Responses' text.format -> chat's response_format (the schema sits one level up there)."""
    if fmt.get("type") != "json_schema":
        return fmt  # text, json_object: the same; anything else is refused by the chat parser
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def _tools(tools: Any) -> list[dict]:
    """Responses' flat function tools -> chat's {"type": "function", "function": {...}}."""
    if not isinstance(tools, list):
        raise ApiError("'tools' must be a list", code="invalid_type", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise value_error(f"tools[{i}]", f"'tools[{i}]': only function tools are served, got {kind!r}")
        out.append({"type": "function", "function": {k: v for k, v in tool.items() if k not in ("type", "strict")}})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice  # "auto", "none", "required"; anything else is refused by the chat parser
