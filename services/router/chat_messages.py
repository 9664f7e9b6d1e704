"""Chat messages of an OpenAI request -> what the chat template renders: roles, text content, an
assistant's earlier tool calls, tool results, and vLLM's template options. Pure: no I/O, no model."""

from __future__ import annotations

import json
from typing import Any

from services.router.params import get_bool, get_dict, value_error
from services.runtime.errors import ApiError

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _message_content(i: int, message: dict) -> str:
    content = message.get("content")
    param = f"messages[{i}].content"
    if content is None:
        if message["role"] == "assistant":  # e.g. one that made tool calls
            return ""
        raise ApiError(f"'{param}' is required", code="missing_required_parameter", param=param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(f"'{param}': only text content parts are supported", param=param)
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(f"'{param}' must be a string or a list of text parts", code="invalid_type", param=param)


def chat_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError("'messages' is required", code="missing_required_parameter", param="messages")
    if not isinstance(messages, list):
        raise ApiError("'messages' must be a list", code="invalid_type", param="messages")
    if not messages:
        raise value_error("messages", "'messages' must contain at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(f"'messages[{i}]' must be an object", code="invalid_type", param=f"messages[{i}]")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise value_error(
                f"messages[{i}].role", f"'messages[{i}].role' must be one of {sorted(CHAT_ROLES)}, got {role!r}"
            )
        out.append({"role": role, "content": _message_content(i, message), **_tool_fields(i, message)})
    return out


# apply_chat_template's own arguments: set by the server, or by their own request fields
_RESERVED_TEMPLATE_ARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "tokenize", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "add_generation_prompt", "continue_final_message",
})


def template_options(body: dict) -> dict:
    """vLLM's chat-template fields: add_generation_prompt, continue_final_message (an answer that
    continues the last assistant message) and chat_template_kwargs (the template's own variables,
    e.g. enable_thinking). Only what the request sets, as {"chat_template_kwargs": {...}}."""
    kwargs = dict(get_dict(body, "chat_template_kwargs") or {})
    reserved = sorted(_RESERVED_TEMPLATE_ARGS & set(kwargs))
    if reserved:
        raise value_error("chat_template_kwargs", f"'chat_template_kwargs' may not set {reserved}"
                          + ("; use the request fields of the same name" if set(reserved) & {
                              "add_generation_prompt", "continue_final_message"} else ""))
    for name, default in (("add_generation_prompt", True), ("continue_final_message", False)):
        value = get_bool(body, name, default)
        if value != default:
            kwargs[name] = value
    if kwargs.get("continue_final_message") and kwargs.get("add_generation_prompt", True):
        raise value_error("continue_final_message", "'continue_final_message' continues the last message: "
                                                    "set 'add_generation_prompt' to false with it")
    return {"chat_template_kwargs": kwargs} if kwargs else {}


def _tool_fields(i: int, message: dict) -> dict:
    """An assistant's earlier tool_calls and a tool result's tool_call_id, for the chat template;
    a call's JSON arguments become an object, as templates (and vLLM) expect."""
    out: dict = {}
    calls = message.get("tool_calls")
    if calls is not None and message["role"] == "assistant":
        param = f"messages[{i}].tool_calls"
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  and isinstance(c["function"].get("name"), str) for c in calls):
            raise ApiError(f"'{param}' must be a list of {{\"id\", \"type\": \"function\", \"function\": "
                           "{\"name\", \"arguments\"}}", code="invalid_type", param=param)
        out["tool_calls"] = [
            {**c, "function": {**c["function"], "arguments": _arguments(c["function"].get("arguments"))}}
            for c in calls
        ]
    if message["role"] == "tool" and isinstance(message.get("tool_call_id"), str):
        out["tool_call_id"] = message["tool_call_id"]
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
