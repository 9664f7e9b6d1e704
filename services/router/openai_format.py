"""Engine deltas -> OpenAI wire objects (chat.completion[.chunk], text_completion). Pure."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field

from services.router.protocol import Endpoint, ParsedRequest
from services.router.reasoning import ReasoningStream, split_reasoning
from services.router.tool_parsers import ToolStream, parse_answer, stream_parser
from services.router.tools import ToolMode, new_call_id, new_tool_call, tool_calls
from services.runtime.errors import ApiError, error_payload
from services.runtime.wire import DeltaFrame


@dataclass(slots=True)
class ChoiceState:
    """What one choice has produced so far."""

    index: int
    prompt_index: int
    text_parts: list[str] = field(default_factory=list)
    logprob_entries: list = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV the worker's prefix cache held
    text_offset: int = 0  # characters emitted so far (completions' logprobs.text_offset)
    started: bool = False  # chat: the role delta has gone out
    tool_call_id: str | None = None  # a named tool_choice's call, once its first delta has gone out
    tool_parser: ToolStream | None = None  # tool_choice "auto", streaming: calls so far
    num_tool_calls: int = 0  # tool_choice "auto", streaming: calls sent
    pending_logprobs: list = field(default_factory=list)  # "auto", streaming: of text held back
    reasoning: ReasoningStream | None = None  # --reasoning-parser, streaming: where the answer is
    # vLLM's return_token_ids / prompt_logprobs: what the first delta said of the prompt; the ids generated
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list | None = None
    token_ids: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None  # vLLM's: the stop token id or string that ended it
    unsent_token_ids: list[int] = field(default_factory=list)  # streaming: not in a chunk yet


def usage(choices: list[ChoiceState]) -> dict:
    prompt_tokens = {c.prompt_index: c.num_prompt_tokens for c in choices}  # a prompt counts once for n>1
    cached_tokens = {c.prompt_index: c.num_cached_tokens for c in choices}
    num_prompt = sum(prompt_tokens.values())
    num_completion = sum(c.num_generated_tokens for c in choices)
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion, "total_tokens": num_prompt + num_completion,
            "prompt_tokens_details": {"cached_tokens": sum(cached_tokens.values())}}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _feed(stream: ReasoningStream | ToolStream, frame: DeltaFrame) -> tuple:
    """A streaming splitter's two parts for this delta's text; at the answer's end, plus what its
    finish() still held."""
    first, second = stream.feed(frame.text)
    if frame.finish_reason is not None:
        more_first, more_second = stream.finish()
        first, second = first + more_first, second + more_second
    return first, second


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def _named(token_id: int, token: str, as_ids: bool) -> str:
    # vLLM's return_tokens_as_token_ids: "token_id:{id}" identifies tokens whose text is not
    # valid UTF-8 on its own (a byte-fallback piece of a multi-byte character)
    return f"token_id:{token_id}" if as_ids else token


def chat_logprobs(entries: list, as_ids: bool = False) -> dict:
    """entries: (token id, text, logprob, top [(id, text, logprob)]) per generated token."""
    content = []
    for token_id, tok, lp, top in entries:
        name = _named(token_id, tok, as_ids)
        alternatives = [_named(i, t, as_ids) for i, t, _ in top]
        content.append({"token": name, "logprob": lp, "bytes": _token_bytes(name),
                        "top_logprobs": [{"token": a, "logprob": l, "bytes": _token_bytes(a)}
                                         for a, (_, _, l) in zip(alternatives, top)]})
    return {"content": content}


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # JSON has no -inf; vLLM's floor


def prompt_logprobs_json(entries: list) -> list:
    """vLLM's prompt_logprobs: None for the first token (nothing predicts it), then per token
    {token id: {logprob, rank, decoded_token}}: the prompt's own token first, then the top
    alternatives not already there (ranks 1..k)."""
    out: list = []
    for token_id, token, logprob, rank, top in entries:
        if logprob is None:
            out.append(None)
            continue
        ranked = {str(token_id): {"logprob": _finite(logprob), "rank": rank, "decoded_token": token}}
        for r, (alt_id, alt, alt_logprob) in enumerate(top, 1):
            ranked.setdefault(str(alt_id), {"logprob": _finite(alt_logprob), "rank": r, "decoded_token": alt})
        out.append(ranked)
    return out


def completion_logprobs(entries: list, start_offset: int, as_ids: bool = False) -> dict:
    offsets, offset = [], start_offset
    for _, tok, _, _ in entries:  # offsets into the text, whatever names the tokens carry
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": [_named(i, tok, as_ids) for i, tok, _, _ in entries],
        "token_logprobs": [lp for _, _, lp, _ in entries],
        "top_logprobs": [None if lp is None else {_named(i, t, as_ids): l for i, t, l in top}
                         for _, _, lp, top in entries],
        "text_offset": offsets,
    }


class Formatter:
    """Builds every object of one response; ids and `created` are fixed per response."""

    def __init__(self, parsed: ParsedRequest, model: str):
        self.parsed = parsed
        self.model = model
        self.chat = parsed.endpoint is Endpoint.CHAT
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._usage_field = {"usage": None} if parsed.include_usage else {}
        self._choices: list[ChoiceState] | None = None  # continuous usage: every choice of the request
        self._tools = parsed.tools if parsed.tools is not None and parsed.tools.calls else None  # answers are calls
        self._auto = parsed.tools is not None and parsed.tools.mode is ToolMode.AUTO  # calls parsed out of text
        self._return_token_ids = bool(parsed.sampling.get("return_token_ids"))
        self._prompt_logprobs = parsed.sampling.get("prompt_logprobs") is not None

    def _chat_lp(self, entries: list) -> dict:
        return chat_logprobs(entries, self.parsed.tokens_as_ids)

    def _completion_lp(self, entries: list, start_offset: int) -> dict:
        return completion_logprobs(entries, start_offset, self.parsed.tokens_as_ids)

    def track(self, choices: list[ChoiceState]) -> None:
        """The request's choices, whose usage so far every chunk carries (continuous usage)."""
        if self.parsed.continuous_usage:
            self._choices = choices

    def _chunk(self, choices: list[dict]) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        usage_field = self._usage_field if self._choices is None else {"usage": usage(self._choices)}
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **usage_field}

    def delta_chunks(self, choice: ChoiceState, frame: DeltaFrame) -> list[dict]:
        """Stream chunks for one delta (already applied to `choice`): role first (chat), then the text
        and logprobs, then an empty delta carrying finish_reason."""
        chunks = []
        if self.chat and not choice.started:
            choice.started = True
            chunks.append(self._chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]))
        num_lead = len(chunks)
        if self.chat and self.parsed.reasoning_parser is not None:
            reasoning, frame = self._split_reasoning(choice, frame)
            if reasoning:
                chunks.append(self._chunk([{"index": choice.index, "delta": {"reasoning_content": reasoning},
                                            "logprobs": None, "finish_reason": None}]))
        if self._tools is not None:
            chunks.extend(self._tool_chunks(choice, frame))
        elif self._auto:
            chunks.extend(self._auto_chunks(choice, frame))
        elif frame.text or frame.logprobs:
            chunks.append(self._chunk([self._content_choice(choice, frame)]))
        num_output = len(chunks) - num_lead
        if frame.finish_reason in ("stop", "length"):
            if self.chat:
                body = {"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": self._finish(choice),
                        "stop_reason": choice.stop_reason}
            else:
                body = {"index": choice.index, "text": "", "logprobs": None, "finish_reason": frame.finish_reason,
                        "stop_reason": choice.stop_reason}
            chunks.append(self._chunk([body]))
        if self._return_token_ids:
            last_output = num_lead + num_output - 1 if num_output else len(chunks) - 1
            self._add_token_ids(choice, frame, chunks, last_output if last_output >= num_lead else None)
        return chunks

    def _add_token_ids(self, choice: ChoiceState, frame: DeltaFrame, chunks: list[dict], carrier: int | None) -> None:
        """vLLM's return_token_ids, streaming: the prompt's ids on a choice's first chunk (completions:
        in its choice), and every chunk's choice a list of ids: the ids generated since they last went
        out, on this delta's last output chunk (else its finish chunk); text held back, e.g. what may
        be a tool call, keeps its ids until it goes out."""
        choice.unsent_token_ids.extend(frame.token_ids)
        if chunks and choice.prompt_token_ids is not None:
            (chunks[0] if self.chat else chunks[0]["choices"][0])["prompt_token_ids"] = choice.prompt_token_ids
            choice.prompt_token_ids = None  # sent
        for chunk in chunks:
            chunk["choices"][0]["token_ids"] = []
        if carrier is not None:
            chunks[carrier]["choices"][0]["token_ids"] = choice.unsent_token_ids
            choice.unsent_token_ids = []

    def _split_reasoning(self, choice: ChoiceState, frame: DeltaFrame) -> tuple[str, DeltaFrame]:
        """This delta's reasoning text, and the delta with only its answer text left."""
        if choice.reasoning is None:
            choice.reasoning = ReasoningStream(self.parsed.reasoning_parser)
        reasoning, content = _feed(choice.reasoning, frame)
        return reasoning, dataclasses.replace(frame, text=content)

    def _tool_chunks(self, choice: ChoiceState, frame: DeltaFrame) -> list[dict]:
        """A named function's arguments stream as they come; "required" calls go out whole at the
        end, once the array parses (cut short by max_tokens, the text goes out as content)."""
        plan = self._tools
        if plan.mode is ToolMode.NAMED:
            if not (frame.text or frame.logprobs):
                return []
            call: dict = {"index": 0, "function": {"arguments": frame.text}}
            if choice.tool_call_id is None:
                choice.tool_call_id = new_call_id(plan.short_ids)
                call = {"index": 0, "id": choice.tool_call_id, "type": "function",
                        "function": {"name": plan.name, "arguments": frame.text}}
            lp = self._chat_lp(frame.logprobs) if frame.logprobs else None
            return [self._chunk([{"index": choice.index, "delta": {"tool_calls": [call]}, "logprobs": lp,
                                  "finish_reason": None}])]
        if frame.finish_reason is None:
            return []
        text = self._answer_text(choice)
        calls = tool_calls(plan, text)
        delta = {"content": text} if calls is None else {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
        lp = self._chat_lp(choice.logprob_entries) if choice.logprob_entries else None
        return [self._chunk([{"index": choice.index, "delta": delta, "logprobs": lp, "finish_reason": None}])]

    def _auto_chunks(self, choice: ChoiceState, frame: DeltaFrame) -> list[dict]:
        """Text streams as content, except what may be a call's markup; each call goes out whole."""
        if choice.tool_parser is None:
            choice.tool_parser = stream_parser(self.parsed.tool_parser)
        content, calls = _feed(choice.tool_parser, frame)
        choice.pending_logprobs.extend(frame.logprobs or ())
        deltas = [{"content": content}] if content or (frame.finish_reason and choice.pending_logprobs) else []
        for name, arguments in calls:
            call = new_tool_call(name, arguments, self.parsed.tools.short_ids)
            deltas.append({"tool_calls": [{"index": choice.num_tool_calls, **call}]})
            choice.num_tool_calls += 1
        out = []
        for delta in deltas:
            lp = self._chat_lp(choice.pending_logprobs) if choice.pending_logprobs else None
            choice.pending_logprobs = []
            out.append(self._chunk([{"index": choice.index, "delta": delta, "logprobs": lp, "finish_reason": None}]))
        return out

    def _answer_text(self, choice: ChoiceState) -> str:
        """All of the choice's text but its reasoning."""
        text = "".join(choice.text_parts)
        return text if self.parsed.reasoning_parser is None else split_reasoning(self.parsed.reasoning_parser, text)[1]

    def _finish(self, choice: ChoiceState, made_calls: bool | None = None) -> str | None:
        """OpenAI's finish_reason: "tool_calls" when the model chose to call ("required", "auto");
        a named function was the caller's choice, so that one ends with "stop"."""
        if choice.finish_reason != "stop":
            return choice.finish_reason
        if self._auto:
            made_calls = choice.num_tool_calls > 0 if made_calls is None else made_calls
            return "tool_calls" if made_calls else "stop"
        plan = self._tools
        if (plan is not None and plan.mode is ToolMode.REQUIRED
                and tool_calls(plan, self._answer_text(choice)) is not None):  # a stop string may cut it
            return "tool_calls"
        return choice.finish_reason

    def _content_choice(self, choice: ChoiceState, frame: DeltaFrame) -> dict:
        if self.chat:
            lp = self._chat_lp(frame.logprobs) if frame.logprobs else None
            return {"index": choice.index, "delta": {"content": frame.text}, "logprobs": lp, "finish_reason": None}
        lp = self._completion_lp(frame.logprobs, choice.text_offset - len(frame.text)) if frame.logprobs else None
        return {"index": choice.index, "text": frame.text, "logprobs": lp, "finish_reason": None}

    def usage_chunk(self, choices: list[ChoiceState]) -> dict:
        return {**self._chunk([]), "usage": usage(choices)}

    # --- the stream's bytes (services.router.completions) ---
    def stream_head(self) -> bytes:
        return b""

    def stream_chunks(self, choice: ChoiceState, frame: DeltaFrame) -> bytes:
        return b"".join(sse(c) for c in self.delta_chunks(choice, frame))

    def stream_tail(self, choices: list[ChoiceState]) -> bytes:
        """The usage chunk (stream_options.include_usage), then [DONE]."""
        return (sse(self.usage_chunk(choices)) if self.parsed.include_usage else b"") + b"data: [DONE]\n\n"

    def stream_error(self, err: ApiError) -> bytes:
        return sse(error_payload(err))

    def full_response(self, choices: list[ChoiceState]) -> dict:
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            text = "".join(c.text_parts)
            if self.chat:
                lp = self._chat_lp(c.logprob_entries) if self.parsed.sampling["logprobs"] is not None else None
                reasoning = None
                if self.parsed.reasoning_parser is not None:
                    reasoning, text = split_reasoning(self.parsed.reasoning_parser, text)
                content, calls = text, None
                if self._tools is not None:
                    calls = tool_calls(self._tools, text)
                    content = None if calls is not None else text
                elif self._auto:
                    content, found = parse_answer(self.parsed.tool_parser, text)
                    short = self.parsed.tools.short_ids
                    calls = [new_tool_call(name, arguments, short) for name, arguments in found] or None
                message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {}),
                           **({"reasoning_content": reasoning} if reasoning is not None else {})}
                finish = self._finish(c, made_calls=bool(calls)) if calls is not None else c.finish_reason
                out.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish,
                            "stop_reason": c.stop_reason, **self._token_ids(c)})
            else:
                lp = self._completion_lp(c.logprob_entries, 0) if self.parsed.sampling["logprobs"] is not None else None
                out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason, **self._prompt_fields(c), **self._token_ids(c)})
        response = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                    "created": self.created, "model": self.model, "choices": out, "usage": usage(choices)}
        if self.chat:  # one prompt: its fields go on the response, as vLLM's
            response.update(self._prompt_fields(min(choices, key=lambda c: c.index)))
        return response

    def _prompt_fields(self, choice: ChoiceState) -> dict:
        out: dict = {}
        if self._prompt_logprobs:
            out["prompt_logprobs"] = prompt_logprobs_json(choice.prompt_logprobs or [])
        if self._return_token_ids:
            out["prompt_token_ids"] = choice.prompt_token_ids
        return out

    def _token_ids(self, choice: ChoiceState) -> dict:
        return {"token_ids": choice.token_ids} if self._return_token_ids else {}


def apply_delta(choice: ChoiceState, frame: DeltaFrame) -> None:
    choice.text_parts.append(frame.text)
    choice.text_offset += len(frame.text)
    choice.token_ids.extend(frame.token_ids)
    if frame.prompt_token_ids is not None:
        choice.prompt_token_ids = frame.prompt_token_ids
    if frame.prompt_logprobs is not None:
        choice.prompt_logprobs = frame.prompt_logprobs
    if frame.logprobs:
        choice.logprob_entries.extend(frame.logprobs)
    choice.num_prompt_tokens = frame.num_prompt_tokens
    choice.num_generated_tokens = frame.num_generated_tokens
    choice.num_cached_tokens = frame.num_cached_tokens
    if frame.finish_reason is not None:
        choice.finish_reason = frame.finish_reason
        choice.stop_reason = frame.stop_reason
