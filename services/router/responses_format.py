"""OpenAI Responses API objects (`response`, and its stream events) built from the chat formatter's
output for the same request. Pure.

A chat answer becomes output items in order: its reasoning (`reasoning`, with a --reasoning-parser),
its text (`message` with one `output_text` part), its tool calls (one `function_call` each).
Streamed, each item is opened (`response.output_item.added`), filled by deltas and closed
(`...done`, `response.output_item.done`) as the chat chunks come; `response.completed` (or
`response.incomplete` when max_output_tokens cut it) carries the whole response last.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

from services.router.openai_format import ChoiceState, Formatter, usage
from services.router.protocol import ParsedRequest
from services.router.responses_request import ResponseEcho
from services.runtime.errors import ApiError
from services.runtime.wire import DeltaFrame

_PREFIX = {"message": "msg_", "reasoning": "rs_", "function_call": "fc_"}


def _new_id(kind: str) -> str:
    return _PREFIX[kind] + uuid.uuid4().hex


def _responses_usage(choices: list[ChoiceState]) -> dict:
    u = usage(choices)
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": u["prompt_tokens_details"],
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u["total_tokens"]}


def _text_item(kind: str, item_id: str, text: str, status: str, logprobs: list | None = None) -> dict:
    if kind == "reasoning":
        return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": text}]}
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]}


class ResponsesFormatter:
    """The Responses objects of one request; the chat Formatter does the parsing (reasoning, tools)."""

    def __init__(self, parsed: ParsedRequest, model: str, echo: ResponseEcho,
                 on_done: Callable[[dict], None] | None = None):
        """on_done: given the finished response object (completed or incomplete), e.g. to store it."""
        self._chat = Formatter(parsed, model)
        self._on_done = on_done
        self.id = self.response_id = "resp_" + uuid.uuid4().hex  # also names the worker sequences
        self._model = model
        self._echo = echo
        self._created = int(time.time())
        self._seq = 0
        self._items: list[dict] = []  # streamed: the items closed so far
        self._open: dict | None = None  # streamed: {kind, id, text} of the item being filled
        self._finish: str | None = None

    def track(self, choices: list[ChoiceState]) -> None:
        self._chat.track(choices)

    def response(self, status: str, output: list[dict], choices: list[ChoiceState] | None) -> dict:
        e = self._echo
        return {
            "id": self.response_id, "object": "response", "created_at": self._created, "status": status,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": e.instructions, "max_output_tokens": e.max_output_tokens, "model": self._model,
            "output": output, "parallel_tool_calls": e.parallel_tool_calls,
            "previous_response_id": e.previous_response_id,
            "reasoning": e.reasoning or {"effort": None, "summary": None}, "store": e.store,
            "temperature": e.temperature, "text": {"format": e.text_format}, "tool_choice": e.tool_choice,
            "tools": e.tools, "top_p": e.top_p, "truncation": "disabled",
            "usage": _responses_usage(choices) if choices is not None else None, "user": e.user, "metadata": e.metadata,
        }

    def full_response(self, choices: list[ChoiceState]) -> dict:
        (choice,) = self._chat.full_response(choices)["choices"]
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        message, output = choice["message"], []
        if message.get("reasoning_content"):
            output.append(_text_item("reasoning", _new_id("reasoning"), message["reasoning_content"], "completed"))
        calls = message.get("tool_calls") or []
        if message.get("content") or not calls:
            logprobs = (choice.get("logprobs") or {}).get("content")  # include: message.output_text.logprobs
            output.append(_text_item("message", _new_id("message"), message.get("content") or "", status, logprobs))
        for call in calls:
            output.append({"type": "function_call", "id": _new_id("function_call"), "call_id": call["id"],
                           "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                           "status": "completed"})
        return self._done(self.response(status, output, choices))

    def _done(self, response: dict) -> dict:
        if self._on_done is not None:
            self._on_done(response)
        return response

    # --- streaming (services.router.completions) ---
    def stream_head(self) -> bytes:
        created = self.response("in_progress", [], None)
        return self._encode([self._event("response.created", response=created),
                             self._event("response.in_progress", response=created)])

    def stream_chunks(self, choice: ChoiceState, frame: DeltaFrame) -> bytes:
        events = []
        for chunk in self._chat.delta_chunks(choice, frame):
            body = chunk["choices"][0]
            delta = body.get("delta") or {}
            if delta.get("reasoning_content"):
                events += self._append("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                events += self._append("message", delta["content"], (body.get("logprobs") or {}).get("content"))
            for call in delta.get("tool_calls") or []:
                if "id" in call:  # a new call
                    events += self._close()
                    events += self._open_item("function_call", call_id=call["id"], name=call["function"]["name"])
                if call["function"].get("arguments"):
                    events += self._append("function_call", call["function"]["arguments"])
            if body.get("finish_reason") is not None:
                self._finish = body["finish_reason"]
                events += self._close()
        return self._encode(events)

    def stream_tail(self, choices: list[ChoiceState]) -> bytes:
        events = self._close()
        status = "incomplete" if self._finish == "length" else "completed"
        response = self._done(self.response(status, self._items, choices))
        events.append(self._event(f"response.{status}", response=response))
        return self._encode(events)

    def stream_error(self, err: ApiError) -> bytes:
        return self._encode([self._event("error", code=err.code, message=err.message, param=err.param)])

    def _append(self, kind: str, text: str, logprobs: list | None = None) -> list[dict]:
        events = [] if self._open is not None and self._open["kind"] == kind else self._close() + self._open_item(kind)
        item = self._open
        item["text"] += text
        item["logprobs"] += logprobs or []
        where = {"item_id": item["id"], "output_index": len(self._items)}
        if kind == "function_call":
            return events + [self._event("response.function_call_arguments.delta", **where, delta=text)]
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": logprobs or []} if kind == "message" else {}
        return events + [self._event(name, **where, content_index=0, delta=text, **extra)]

    def _open_item(self, kind: str, **call) -> list[dict]:
        self._open = {"kind": kind, "id": _new_id(kind), "text": "", "logprobs": [], **call}
        item = self._item("in_progress")
        if kind == "message":
            item["content"] = []
        events = [self._event("response.output_item.added", output_index=len(self._items), item=item)]
        if kind != "function_call":
            part = self._item("in_progress")["content"][0]
            events.append(self._event("response.content_part.added", item_id=self._open["id"],
                                      output_index=len(self._items), content_index=0, part=part))
        return events

    def _item(self, status: str) -> dict:
        item = self._open
        if item["kind"] == "function_call":
            return {"type": "function_call", "id": item["id"], "call_id": item["call_id"], "name": item["name"],
                    "arguments": item["text"], "status": status}
        return _text_item(item["kind"], item["id"], item["text"], status, item["logprobs"])

    def _close(self) -> list[dict]:
        if self._open is None:
            return []
        kind, where = self._open["kind"], {"item_id": self._open["id"], "output_index": len(self._items)}
        status = "incomplete" if kind == "message" and self._finish == "length" else "completed"
        item = self._item(status)
        if kind == "function_call":
            events = [self._event("response.function_call_arguments.done", **where, arguments=item["arguments"])]
        else:
            part = item["content"][0]
            done = "response.output_text.done" if kind == "message" else "response.reasoning_text.done"
            events = [self._event(done, **where, content_index=0, text=part["text"],
                                  **({"logprobs": part["logprobs"]} if kind == "message" else {})),
                      self._event("response.content_part.done", **where, content_index=0, part=part)]
        events.append(self._event("response.output_item.done", output_index=len(self._items), item=item))
        self._items.append(item)
        self._open = None
        return events

    def _event(self, kind: str, **fields) -> dict:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **fields}

    @staticmethod
    def _encode(events: list[dict]) -> bytes:
        return b"".join(f"event: {e['type']}\ndata: ".encode() + json.dumps(e, separators=(",", ":"),
                                                                             ensure_ascii=False).encode() + b"\n\n"
                        for e in events)
