"""Stored responses (OpenAI's `store`, on by default): GET and DELETE /v1/responses/{id}, and
`previous_response_id`, which goes on with the conversation a stored response ended. Kept in the
router's memory, the newest `max_entries` of them: a restarted router, or another one, does not
know them. Pure."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: dict  # the response object, as it was returned
    # Its conversation as chat messages: the previous response's, its own input and its output.
    # Not its instructions: as OpenAI's, a follow-up does not inherit them.
    conversation: tuple[dict, ...]


class ResponseStore:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries  # 0: nothing is stored
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, conversation: list[dict]) -> None:
        if not self.enabled:
            return
        self._entries[response["id"]] = StoredResponse(response, tuple(conversation))
        self._entries.move_to_end(response["id"])
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._entries.get(response_id)
        if stored is not None:
            self._entries.move_to_end(response_id)  # a conversation in use stays
        return stored

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None


def output_messages(output: list[dict]) -> list[dict]:
    """A response's output items as the chat messages that go on with its conversation: text as an
    assistant message, calls as its tool_calls (reasoning is left out, as chat templates do)."""
    messages: list[dict] = []
    for item in output:
        if item["type"] == "message":
            text = "".join(part["text"] for part in item["content"] if part.get("type") == "output_text")
            messages.append({"role": "assistant", "content": text})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant":  # the text before it, or the calls made with it
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    return messages
