"""Tool calling for chat: OpenAI's `tools` and `tool_choice`, as vLLM serves them. Pure.

A named `tool_choice` constrains the answer to that function's parameters (a JSON schema); with
"required" the answer is a JSON array of calls, `[{"name": ..., "parameters": {...}}, ...]`, each
item one of the tools. Both go to the worker as a structured output, so the answer always parses,
and come back as `message.tool_calls`. With "auto" the model chooses: its calls are parsed out of
its text by the router's --tool-call-parser (services.router.tool_parsers); without one, "auto" is
refused with a 400 saying what works instead.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Any

from services.router.params import get_bool, value_error
from services.runtime.errors import ApiError

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_ANY_OBJECT = {"type": "object"}
_ALNUM = string.ascii_letters + string.digits


class ToolMode(enum.Enum):
    NONE = "none"  # the template shows the tools, the answer is text (as vLLM by default)
    NAMED = "named"  # the answer is the arguments of one given function
    REQUIRED = "required"  # the answer is one or more calls of any of the tools
    AUTO = "auto"  # the answer is text, calls in the model's markup, or both


@dataclass(frozen=True, slots=True)
class ToolPlan:
    mode: ToolMode
    tools: tuple[dict, ...]  # as the request gave them: the chat template renders them
    name: str | None  # NAMED: the function called
    schema: dict | None  # what the answer must match (None: NONE)
    short_ids: bool = False  # call ids of 9 letters and digits (Mistral's templates accept no others)

    @property
    def calls(self) -> bool:
        """The answer is constrained to tool calls."""
        return self.mode in (ToolMode.NAMED, ToolMode.REQUIRED)

    def structured(self) -> dict:
        """The engine's StructuredOutput wire form for the answer."""
        return {"kind": "json_schema", "spec": json.dumps(self.schema), "choices": [], "param": "tool_choice"}


def functions(body: dict) -> list[dict]:
    """The request's tools' function definitions, checked (400 naming what is wrong)."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        raise ApiError("'tools' must be a list", code="invalid_type", param="tools")
    if len(tools) > MAX_TOOLS:
        raise value_error("tools", f"'tools' allows at most {MAX_TOOLS} tools, got {len(tools)}")
    out = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ApiError(f"'{param}' must be {{\"type\": \"function\", \"function\": {{...}}}}", code="invalid_type",
                           param=param)
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise value_error(f"{param}.function.name", f"'{param}.function.name' must be 1-64 letters, digits, "
                                                        f"'_' or '-', got {name!r}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ApiError(f"'{param}.function.parameters' must be a JSON schema object", code="invalid_type",
                           param=f"{param}.function.parameters")
        if name in (f["name"] for f in out):
            raise value_error("tools", f"'tools' names the function {name!r} twice")
        out.append(fn)
    return out


def parse_tools(body: dict, parser: str | None = None) -> ToolPlan | None:
    """The request's tool use, or None without tools. parser: the router's --tool-call-parser."""
    plan = _plan(body, parser)
    return dataclasses.replace(plan, short_ids=True) if plan is not None and parser == "mistral" else plan


def _plan(body: dict, parser: str | None) -> ToolPlan | None:
    choice = body.get("tool_choice")
    if body.get("tools") is None or body.get("tools") == []:
        if choice not in (None, "none"):
            raise value_error("tool_choice", "'tool_choice' needs 'tools'")
        return None
    fns = functions(body)
    tools = tuple(body["tools"])
    if choice is None or choice == "auto":
        if parser is None:
            raise value_error("tool_choice", "tool_choice 'auto' (the default with tools) needs a parser for the "
                                             "model's tool-call markup: start the router with --tool-call-parser "
                                             "(hermes, llama3_json or mistral), or set tool_choice to 'required', "
                                             "'none' or {\"type\": \"function\", \"function\": {\"name\": ...}}")
        return ToolPlan(ToolMode.AUTO, tools, None, None)
    if choice == "none":
        return ToolPlan(ToolMode.NONE, tools, None, None)
    if choice == "required":
        parallel = get_bool(body, "parallel_tool_calls", True)
        calls = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                                             "parameters": f.get("parameters") or _ANY_OBJECT},
                            "required": ["name", "parameters"]} for f in fns]}
        schema = {"type": "array", "minItems": 1, "items": calls, **({} if parallel else {"maxItems": 1})}
        return ToolPlan(ToolMode.REQUIRED, tools, None, schema)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        else None
    if not isinstance(name, str):
        raise value_error("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                                         "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    fn = next((f for f in fns if f["name"] == name), None)
    if fn is None:
        raise value_error("tool_choice", f"'tool_choice' names {name!r}, which is not among 'tools'")
    return ToolPlan(ToolMode.NAMED, tools, name, fn.get("parameters") or _ANY_OBJECT)


def new_call_id(short: bool = False) -> str:
    if short:  # Mistral's: 9 letters and digits
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + uuid.uuid4().hex[:24]


def tool_calls(plan: ToolPlan, text: str) -> list[dict] | None:
    """The answer as OpenAI tool_calls, or None when it does not parse (cut short by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if plan.mode is ToolMode.NAMED:
        return [new_tool_call(plan.name, text, plan.short_ids)]
    return [new_tool_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False), plan.short_ids) for c in value]


def new_tool_call(name: str, arguments: str, short_id: bool = False) -> dict[str, Any]:
    """One entry of message.tool_calls."""
    return {"id": new_call_id(short_id), "type": "function", "function": {"name": name, "arguments": arguments}}
