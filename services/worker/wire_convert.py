"""Wire messages <-> engine objects (the worker side of services/runtime/wire.py)."""

from __future__ import annotations

from services.runtime.errors import ApiError
from services.runtime.wire import DeltaFrame, GenerateCall
from services.worker.engine.api import Delta, GenerateRequest, InvalidRequest, SamplingParams, StructuredOutput

_TUPLE_FIELDS = ("stop", "stop_token_ids", "allowed_token_ids", "bad_words")


def to_generate_request(call: GenerateCall, defaults: dict | None = None) -> GenerateRequest:
    """defaults: SamplingParams fields for what the call leaves unset (the model's generation config)."""
    sampling = {**(defaults or {}), **call.sampling}
    for name in _TUPLE_FIELDS:
        if name in sampling:
            sampling[name] = tuple(sampling[name])
    if "logit_bias" in sampling:  # msgpack: [[token id, bias], ...]
        try:
            sampling["logit_bias"] = tuple((int(t), float(b)) for t, b in sampling["logit_bias"])
        except (TypeError, ValueError) as e:
            raise ApiError(f"bad logit_bias: {e}", code="invalid_value", param="logit_bias") from e
    if sampling.get("structured") is not None:  # msgpack: StructuredOutput.to_obj()
        try:
            sampling["structured"] = StructuredOutput.from_obj(sampling["structured"])
        except InvalidRequest as e:
            raise ApiError(e.message, code="invalid_value", param=e.param) from e
    try:
        params = SamplingParams(**sampling)
    except TypeError as e:
        raise ApiError(f"bad sampling parameters: {e}", code="invalid_value") from e
    return GenerateRequest(
        request_id=call.request_id,
        sampling=params,
        prompt=call.prompt,
        prompt_token_ids=tuple(call.prompt_token_ids) if call.prompt_token_ids is not None else None,
        messages=tuple(call.messages) if call.messages is not None else None,
        tools=tuple(call.tools) if call.tools is not None else None,
        chat_template_kwargs=call.chat_template_kwargs,
        lora_name=call.lora_name,
    )


def to_frame(delta: Delta) -> DeltaFrame:
    logprobs = prompt_logprobs = None
    if delta.logprobs is not None:
        logprobs = [[lp.token_id, lp.token, lp.logprob, [list(t) for t in lp.top]] for lp in delta.logprobs]
    if delta.prompt_logprobs is not None:
        prompt_logprobs = [[lp.token_id, lp.token, lp.logprob, lp.rank, [list(t) for t in lp.top]]
                           for lp in delta.prompt_logprobs]
    return DeltaFrame(
        token_ids=list(delta.token_ids), text=delta.text, num_prompt_tokens=delta.num_prompt_tokens,
        num_generated_tokens=delta.num_generated_tokens,
        finish_reason=delta.finish_reason.value if delta.finish_reason is not None else None,
        logprobs=logprobs, error=delta.error, num_cached_tokens=delta.num_cached_tokens,
        prompt_token_ids=list(delta.prompt_token_ids) if delta.prompt_token_ids is not None else None,
        prompt_logprobs=prompt_logprobs, stop_reason=delta.stop_reason,
    )
