"""Messages between the worker's HTTP front and its engine process, over one socketpair.

Each message is one msgpack array whose first item names it; a stream of them needs no framing
beyond msgpack's own (`msgpack.Unpacker`). Plain Python, no torch: the front never imports it.

front -> engine: ["config", {...}]  ["submit", GenerateCall fields]  ["abort", request_id]
                 ["kv_summary", {...}]  ["stop"]
engine -> front: ["ready", {...}]  ["step", [delta, ...], stats]  ["stats", stats]
                 ["reject", request_id, code, message, param]  ["fatal", message]
"""

from __future__ import annotations

import dataclasses

import msgpack

from services.runtime.wire import GenerateCall
from services.worker.engine.api import (
    ContextLengthExceeded, Delta, EngineError, EngineOverloaded, EngineStats, FinishReason, GenerateRequest,
    InvalidRequest, KVCapacityBusy, NotFound, TokenLogprob,
)
from services.worker.wire_convert import to_generate_request

_ERRORS = {cls.code: cls for cls in (InvalidRequest, ContextLengthExceeded, KVCapacityBusy, EngineOverloaded,
                                      NotFound)}


def pack(message: list) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=256 << 20)


def request_to_obj(request: GenerateRequest) -> dict:
    """GenerateCall's fields (the router's wire form), read back by wire_convert.to_generate_request."""
    s = request.sampling
    return {
        "request_id": request.request_id, "prompt": request.prompt,
        "prompt_token_ids": list(request.prompt_token_ids) if request.prompt_token_ids is not None else None,
        "messages": [dict(m) for m in request.messages] if request.messages is not None else None,
        "tools": list(request.tools) if request.tools is not None else None,
        "chat_template_kwargs": request.chat_template_kwargs, "lora_name": request.lora_name,
        "sampling": {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
        | ({"structured": s.structured.to_obj()} if s.structured is not None else {}),
    }


def request_from_obj(obj: dict) -> GenerateRequest:
    return to_generate_request(GenerateCall(**obj))


def delta_to_obj(d: Delta) -> list:
    finish = d.finish_reason.value if d.finish_reason is not None else None
    return [d.request_id, d.token_ids, d.text, d.num_prompt_tokens, d.num_generated_tokens, finish,
            _logprobs_to_obj(d.logprobs), d.error, d.num_cached_tokens, d.prompt_token_ids,
            _logprobs_to_obj(d.prompt_logprobs), d.stop_reason]


def delta_from_obj(obj: list) -> Delta:
    (request_id, token_ids, text, num_prompt, num_generated, finish, logprobs, error, num_cached,
     prompt_token_ids, prompt_logprobs, stop_reason) = obj
    return Delta(request_id, tuple(token_ids), text, num_prompt, num_generated,
                 FinishReason(finish) if finish is not None else None, _logprobs_from_obj(logprobs), error,
                 num_cached, tuple(prompt_token_ids) if prompt_token_ids is not None else None,
                 _logprobs_from_obj(prompt_logprobs), stop_reason)


def _logprobs_to_obj(entries: tuple[TokenLogprob, ...] | None) -> list | None:
    return None if entries is None else [[lp.token_id, lp.token, lp.logprob, lp.top, lp.rank] for lp in entries]


def _logprobs_from_obj(obj: list | None) -> tuple[TokenLogprob, ...] | None:
    if obj is None:
        return None
    return tuple(TokenLogprob(i, t, lp, tuple(tuple(x) for x in top), rank) for i, t, lp, top, rank in obj)


def stats_to_obj(s: EngineStats) -> list:
    return [s.num_running, s.num_waiting, s.num_free_blocks, s.num_total_blocks, s.block_size, s.num_spec_proposed,
            s.num_spec_accepted, s.num_remote_blocks, s.num_remote_cached_blocks, s.num_preemptions]


def stats_from_obj(obj: list) -> EngineStats:
    return EngineStats(*obj)


def reject_message(request_id: str, e: EngineError) -> list:
    return ["reject", request_id, e.code, e.message, e.param]


def error_from_reject(code: str | None, message: str, param: str | None) -> EngineError:
    return _ERRORS.get(code, InvalidRequest)(message, param)
