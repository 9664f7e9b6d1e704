"""Random request bodies: each parser either refuses one with an ApiError (a 400 naming the field)
or returns what the msgpack wire to the worker can carry. Anything else would be a 500. Fixed seed."""

import random

import msgpack
import pytest

from services.router.protocol import parse_chat_request, parse_completion_request
from services.router.responses_request import chat_body
from services.runtime.errors import ApiError
from services.runtime.wire import GenerateCall, encode

VALUES = [None, 0, -1, 1, 3, 21, 2**63, 2**70, -2**70, 1.5, -0.5, 1e308, "", "x", "a" * 2000, True, False, [],
          {}, [1], [2**64], ["a"], [{}], {"a": 1}, {"2": 1}, {str(2**64): 1}, [{"role": "user", "content": "x"}],
          {"type": "json_schema"}, {"include_usage": True}]
COMMON = ["model", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop", "stream", "stream_options",
          "max_tokens", "min_tokens", "logprobs", "logit_bias", "frequency_penalty", "presence_penalty",
          "repetition_penalty", "stop_token_ids", "allowed_token_ids", "bad_words", "ignore_eos", "priority",
          "truncate_prompt_tokens", "prompt_logprobs", "return_token_ids", "cache_salt", "skip_special_tokens",
          "response_format", "structured_outputs", "include_stop_str_in_output"]
CHAT_ONLY = ["messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "chat_template_kwargs",
             "add_generation_prompt", "continue_final_message", "parallel_tool_calls"]
COMPLETION_ONLY = ["prompt", "echo", "suffix", "best_of"]
RESPONSES = ["input", "instructions", "max_output_tokens", "text", "tools", "tool_choice", "reasoning", "metadata",
             "include", "top_logprobs", "truncation", "background", "previous_response_id", "temperature", "top_k"]


def _bodies(fields: list[str], base: dict, seed: int, count: int = 1500):
    rng = random.Random(seed)
    for _ in range(count):
        body = dict(base)
        for name in rng.sample(fields, rng.randint(1, 3)):
            body[name] = rng.choice(VALUES)
        yield body


def _carried(parsed) -> None:
    """What would go to a worker encodes (msgpack takes no int past 64 bits)."""
    for prompt in parsed.prompts:
        encode(GenerateCall(request_id="r", sampling={**parsed.sampling, "max_tokens": 16, "seed": None}, **prompt))
    msgpack.packb(parsed.sampling, use_bin_type=True)


@pytest.mark.parametrize("endpoint", ["chat", "completions", "responses"])
def test_a_random_body_is_a_400_or_fit_for_the_wire(endpoint):
    fields = {"chat": COMMON + CHAT_ONLY, "completions": COMMON + COMPLETION_ONLY, "responses": RESPONSES}[endpoint]
    base = {"chat": {"messages": [{"role": "user", "content": "hi"}]}, "completions": {"prompt": "hi"},
            "responses": {"input": "hi"}}[endpoint]
    served = 0
    for body in _bodies(fields, base, seed=len(endpoint)):
        try:
            if endpoint == "responses":
                chat, _, _ = chat_body(body)
                parsed = parse_chat_request(chat, max_n=1, max_stop=4, tool_parser="hermes")
            elif endpoint == "chat":
                parsed = parse_chat_request(body, max_n=4, max_stop=4, tool_parser="hermes")
            else:
                parsed = parse_completion_request(body, max_n=4, max_stop=4)
        except ApiError as e:
            assert 400 <= e.status < 500 and e.message
            continue
        _carried(parsed)
        served += 1
    assert served > 50  # the fuzz reaches the accepting paths too, not only refusals
