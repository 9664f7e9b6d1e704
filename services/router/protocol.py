"""OpenAI request bodies -> one validated ParsedRequest. Pure: no I/O, no model, no torch.

The router cannot tokenize, so limits that need the prompt length (prompt + max_tokens within the
context) are checked by the engine; everything else is checked here, before routing.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

from services.router.chat_messages import chat_messages, template_options
from services.router.params import (
    get_bool, get_dict, get_float, get_int, get_stop, get_str, is_token_id, reject_unsupported, value_error,
)
from services.router.reasoning import CLOSE as THINK_CLOSE
from services.router.reasoning import OPEN as THINK_OPEN
from services.router.structured_params import structured_output
from services.router.tools import ToolMode, ToolPlan, parse_tools
from services.router.tools import functions as tool_functions
from services.runtime.errors import ApiError

# With a reasoning parser, a structured output waits for the reasoning to end (engine: StructuredOutput)
REASONING_MARKERS = {"reasoning_start": THINK_OPEN, "reasoning_end": THINK_CLOSE}
MAX_LOGPROBS = 20
SEED_MODULUS = 2**63
MAX_LOGIT_BIAS = 1024  # token ids one request may bias
MAX_STOP_TOKEN_IDS = 64
MAX_ALLOWED_TOKEN_IDS = 1 << 18
MAX_BAD_WORDS = 64


class Endpoint(enum.Enum):
    CHAT = "chat.completion"
    COMPLETION = "text_completion"


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    endpoint: Endpoint
    model: str | None
    prompts: tuple[dict[str, Any], ...]  # each {"prompt": str} | {"prompt_token_ids": [...]} | {"messages": [...]}
    sampling: dict[str, Any]  # SamplingParams fields except seed (and max_tokens when unset)
    max_tokens: int | None  # None: fill the context
    seed: int | None
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage so far in every chunk
    tools: ToolPlan | None = None  # chat: the tools the template shows, and whether the answer is calls
    reasoning_parser: str | None = None  # chat: reasoning_content apart from content (services.router.reasoning)
    tool_parser: str | None = None  # chat with tool_choice "auto": how calls are written (services.router.tool_parsers)
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:{id}"
    length_penalty: float | None = None  # vLLM's use_beam_search (n is the beam width); None: no beam search

    def choice_seeds(self) -> list[int | None]:
        """One seed per choice: seed, seed+1, ... so n>1 with a seed is reproducible yet varied."""
        if self.seed is None:
            return [None] * self.n
        return [(self.seed + i) % SEED_MODULUS for i in range(self.n)]


def _common(body: dict, endpoint: Endpoint, *, max_n: int, max_stop: int, max_tokens: int | None,
            logprobs: int | None, prompts: tuple[dict, ...]) -> ParsedRequest:
    stream = get_bool(body, "stream")
    stream_options = get_dict(body, "stream_options")
    if stream_options is not None and not stream:
        raise ApiError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include_usage = get_bool(stream_options or {}, "include_usage")
    continuous_usage = include_usage and get_bool(stream_options or {}, "continuous_usage_stats")  # as vLLM
    min_tokens = get_int(body, "min_tokens", 0, minimum=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise value_error("min_tokens", f"'min_tokens' ({min_tokens}) must not exceed max_tokens ({max_tokens})")
    sampling: dict[str, Any] = {
        **_sampler(body),
        "stop": get_stop(body, max_stop),
        "ignore_eos": get_bool(body, "ignore_eos"),
        "min_tokens": min_tokens,
        "logprobs": logprobs,
        **_penalties(body),
    }
    if not get_bool(body, "skip_special_tokens", True):  # vLLM's; sent only when off (older workers lack it)
        sampling["skip_special_tokens"] = False
    if get_bool(body, "include_stop_str_in_output"):  # vLLM's; sent only when on
        sampling["include_stop_str_in_output"] = True
    bad_words = body.get("bad_words")  # vLLM's: words never generated
    if bad_words is not None:
        if not isinstance(bad_words, list) or not all(isinstance(w, str) and w.strip() for w in bad_words):
            raise ApiError("'bad_words' must be a list of non-empty strings", code="invalid_type", param="bad_words")
        if len(bad_words) > MAX_BAD_WORDS:
            raise value_error("bad_words", f"'bad_words' allows at most {MAX_BAD_WORDS} words, got {len(bad_words)}")
        if bad_words:
            sampling["bad_words"] = tuple(bad_words)
    sampling.update(_prompt_outputs(body, stream))
    truncate = get_int(body, "truncate_prompt_tokens", minimum=1)  # vLLM's: the prompt's last k tokens
    if truncate is not None:
        sampling["truncate_prompt_tokens"] = truncate
    structured = structured_output(body)
    if structured is not None:
        sampling["structured"] = structured
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    return ParsedRequest(
        endpoint=endpoint,
        model=get_str(body, "model"),
        prompts=prompts,
        sampling=sampling,
        max_tokens=max_tokens,
        seed=get_int(body, "seed"),
        n=get_int(body, "n", 1, minimum=1, maximum=max_n),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        tokens_as_ids=get_bool(body, "return_tokens_as_token_ids"),
    )


def _sampler(body: dict) -> dict[str, Any]:
    """temperature, top_p, top_k: only those the request sets. The worker fills the others from the
    model's generation config (vLLM's --generation-config), else OpenAI's defaults."""
    out: dict[str, Any] = {}
    temperature = get_float(body, "temperature")
    if temperature is not None:
        if not 0 <= temperature < math.inf:  # 1e999 reads as inf
            raise value_error("temperature", f"'temperature' must be a finite number >= 0, got {temperature}")
        out["temperature"] = temperature
    top_p = get_float(body, "top_p")
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise value_error("top_p", f"'top_p' must be in (0, 1], got {top_p}")
        out["top_p"] = top_p
    top_k = get_int(body, "top_k", minimum=-1)
    if top_k is not None:
        out["top_k"] = top_k if top_k > 0 else None  # -1 and 0: no top-k cut, whatever the model's default
    return out


def _prompt_outputs(body: dict, stream: bool) -> dict[str, Any]:
    """vLLM's prompt_logprobs (each prompt token's logprob, rank and top-k alternatives; not with
    streaming, as vLLM), return_token_ids (the prompt's and the output's token ids) and cache_salt.
    Sent only when set."""
    out: dict[str, Any] = {}
    k = body.get("prompt_logprobs")
    if k == -1:
        raise value_error("prompt_logprobs", f"'prompt_logprobs' -1 (the whole vocabulary) is not served; "
                                             f"ask for at most {MAX_LOGPROBS}")
    k = get_int(body, "prompt_logprobs", minimum=0, maximum=MAX_LOGPROBS)
    if k is not None and stream:
        if k > 0:
            raise value_error("prompt_logprobs", "'prompt_logprobs' is not available when 'stream' is true")
    elif k is not None:
        out["prompt_logprobs"] = k
    if get_bool(body, "return_token_ids"):
        out["return_token_ids"] = True
    priority = get_int(body, "priority")  # vLLM's; see --scheduling-policy
    if priority:
        out["priority"] = priority
    salt = get_str(body, "cache_salt")  # vLLM's: prefix-cache blocks shared only under the same salt
    if salt is not None:
        if not 1 <= len(salt) <= 1024:
            raise value_error("cache_salt", f"'cache_salt' must be 1 to 1024 characters, got {len(salt)}")
        out["cache_salt"] = salt
    return out


def _penalties(body: dict) -> dict[str, Any]:
    """OpenAI's frequency/presence penalties and logit_bias; vLLM's repetition_penalty, min_p,
    stop_token_ids and allowed_token_ids. Only the fields a request sets (the engine's defaults are
    no-ops)."""
    out: dict[str, Any] = {}
    for name in ("frequency_penalty", "presence_penalty"):
        value = get_float(body, name)
        if value is not None:
            if not -2 <= value <= 2:
                raise value_error(name, f"'{name}' must be in [-2, 2], got {value}")
            out[name] = value
    value = get_float(body, "repetition_penalty")
    if value is not None:
        if not value > 0:
            raise value_error("repetition_penalty", f"'repetition_penalty' must be > 0, got {value}")
        out["repetition_penalty"] = value
    value = get_float(body, "min_p")
    if value is not None:
        if not 0 <= value <= 1:
            raise value_error("min_p", f"'min_p' must be in [0, 1], got {value}")
        out["min_p"] = value
    bias = _logit_bias(body)
    if bias:
        out["logit_bias"] = bias
    stop_ids = _token_ids(body, "stop_token_ids", MAX_STOP_TOKEN_IDS)
    if stop_ids is not None:
        out["stop_token_ids"] = stop_ids
    allowed = _token_ids(body, "allowed_token_ids", MAX_ALLOWED_TOKEN_IDS)
    if allowed is not None:
        if not allowed:
            raise value_error("allowed_token_ids", "'allowed_token_ids' must not be empty (leave it out to allow "
                                                   "every token)")
        out["allowed_token_ids"] = allowed
    return out


def _token_ids(body: dict, name: str, cap: int) -> tuple[int, ...] | None:
    """A list of token ids (the worker checks them against the vocabulary), or None if absent."""
    ids = body.get(name)
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(is_token_id(t) for t in ids):
        raise ApiError(f"'{name}' must be a list of non-negative integers", code="invalid_type", param=name)
    if len(ids) > cap:
        raise value_error(name, f"'{name}' allows at most {cap} ids, got {len(ids)}")
    return tuple(ids)


def _logit_bias(body: dict) -> list[list] | None:
    """{"token id": bias in [-100, 100]} -> [[id, bias], ...] by id (the wire carries no int keys)."""
    bias = get_dict(body, "logit_bias")
    if not bias:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise value_error("logit_bias", f"'logit_bias' allows at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}")
    pairs = []
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise value_error("logit_bias", f"'logit_bias' keys must be token ids, got {key!r}") from None
        if not is_token_id(token_id):
            raise value_error("logit_bias", f"'logit_bias' keys must be token ids, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(f"'logit_bias' values must be numbers, got {type(value).__name__} for {key!r}",
                           code="invalid_type", param="logit_bias")
        if not -100 <= value <= 100:
            raise value_error("logit_bias", f"'logit_bias' values must be in [-100, 100], got {value} for {key!r}")
        pairs.append([token_id, float(value)])
    return sorted(pairs)


def parse_chat_request(body: dict, *, max_n: int, max_stop: int, tool_parser: str | None = None,
                       reasoning_parser: str | None = None) -> ParsedRequest:
    """tool_parser: how to find tool calls in an answer with tool_choice "auto" (None: refuse it).
    reasoning_parser: how to find the reasoning before the answer (None: all of it is content)."""
    messages = chat_messages(body)
    reject_unsupported(body, {"audio": None})
    tools = parse_tools(body, tool_parser)
    max_tokens = get_int(body, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", minimum=1)
    logprobs = None
    top_logprobs = get_int(body, "top_logprobs", minimum=0, maximum=MAX_LOGPROBS)
    if get_bool(body, "logprobs"):
        logprobs = top_logprobs or 0
    elif top_logprobs is not None:
        raise ApiError("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    chat = {"messages": messages, **template_options(body)}
    parsed = _common(body, Endpoint.CHAT, max_n=max_n, max_stop=max_stop, max_tokens=max_tokens,
                     logprobs=logprobs, prompts=(chat,))
    if reasoning_parser is not None:
        parsed = dataclasses.replace(parsed, reasoning_parser=reasoning_parser)
        if "structured" in parsed.sampling:  # the grammar applies once the reasoning has ended
            parsed.sampling["structured"] = {**parsed.sampling["structured"], **REASONING_MARKERS}
    if tools is None:
        return _beam_search(body, parsed)
    prompts = ({**chat, "tools": list(tools.tools)},)
    if not tools.calls:
        auto_parser = tool_parser if tools.mode is ToolMode.AUTO else None
        if auto_parser == "mistral":  # its calls follow [TOOL_CALLS], a special token: keep its text (as vLLM)
            parsed.sampling["skip_special_tokens"] = False
        return _beam_search(body, dataclasses.replace(parsed, tools=tools, prompts=prompts, tool_parser=auto_parser))
    if "structured" in parsed.sampling:
        raise value_error("tool_choice", "a tool_choice constrains the answer to its calls: drop "
                                         "'response_format' / 'structured_outputs', or set tool_choice 'none'")
    parsed.sampling["structured"] = tools.structured() | (REASONING_MARKERS if reasoning_parser is not None else {})
    return _beam_search(body, dataclasses.replace(parsed, tools=tools, prompts=prompts))


def _completion_prompts(body: dict) -> tuple[dict, ...]:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError("'prompt' is required", code="missing_required_parameter", param="prompt")
    if isinstance(prompt, str):
        return ({"prompt": prompt},)
    if isinstance(prompt, list) and prompt:
        if all(is_token_id(t) for t in prompt):
            return ({"prompt_token_ids": list(prompt)},)
        if all(isinstance(p, str) for p in prompt):
            return tuple({"prompt": p} for p in prompt)
        if all(isinstance(p, list) and p and all(is_token_id(t) for t in p) for p in prompt):
            return tuple({"prompt_token_ids": list(p)} for p in prompt)
    raise ApiError("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                   code="invalid_type", param="prompt")


# What a beam search request's sampling may hold (at these values where given): beam search picks
# tokens by their raw logprobs, so the fields that edit or filter the distribution do not apply.
_BEAM_NEUTRAL = {"stop": (), "min_tokens": 0, "logprobs": None}
_BEAM_ALLOWED = {"ignore_eos", "max_tokens", "temperature", "top_p", "top_k", "skip_special_tokens",
                 "include_stop_str_in_output", "return_token_ids", "priority", "cache_salt", "truncate_prompt_tokens"}
_BEAM_PARAMS = {"structured": "response_format", "logprobs": "logprobs", "prompt_logprobs": "prompt_logprobs"}


def _beam_search(body: dict, parsed: ParsedRequest) -> ParsedRequest:
    """vLLM's use_beam_search and length_penalty: n beams, each a whole answer, best first."""
    if not get_bool(body, "use_beam_search"):
        return parsed
    if parsed.n > MAX_LOGPROBS // 2:
        raise value_error("n", f"with 'use_beam_search', 'n' is the beam width: at most {MAX_LOGPROBS // 2}")
    if parsed.tools is not None:
        raise value_error("tools", "'tools' do not apply to 'use_beam_search'")
    for key, value in parsed.sampling.items():
        if key in _BEAM_ALLOWED or _BEAM_NEUTRAL.get(key, object()) == value:
            continue
        param = _BEAM_PARAMS.get(key, key)
        raise value_error(param, f"'{param}' does not apply to 'use_beam_search' (tokens are chosen by their logprobs)")
    length_penalty = get_float(body, "length_penalty", 1.0)
    return dataclasses.replace(parsed, length_penalty=length_penalty)


def parse_completion_request(body: dict, *, max_n: int, max_stop: int) -> ParsedRequest:
    prompts = _completion_prompts(body)
    reject_unsupported(body, {"suffix": "", "best_of": 1})
    echo = get_bool(body, "echo")
    # OpenAI's default for /v1/completions; 0 with echo only scores the prompt
    max_tokens = get_int(body, "max_tokens", 16, minimum=0 if echo else 1)
    logprobs = get_int(body, "logprobs", minimum=0, maximum=MAX_LOGPROBS)
    parsed = _common(body, Endpoint.COMPLETION, max_n=max_n, max_stop=max_stop, max_tokens=max_tokens,
                     logprobs=logprobs, prompts=prompts)
    if echo:  # the prompt first, and with logprobs its tokens' logprobs
        parsed.sampling["echo"] = True
    if len(prompts) * parsed.n > max_n:
        raise value_error("n", f"len(prompt) * n = {len(prompts) * parsed.n} exceeds the cap of {max_n} sequences")
    return _beam_search(body, parsed)


def parse_tokenize_request(body: dict) -> tuple[str | None, dict]:
    """vLLM's /tokenize: a prompt, or chat messages (with tools and the chat-template fields) ->
    (model, what the worker tokenizes)."""
    out: dict[str, Any] = {"return_token_strs": get_bool(body, "return_token_strs")}
    if body.get("messages") is not None:
        out["messages"] = chat_messages(body)
        out.update(template_options(body))
        if body.get("tools") is not None:
            out["tools"] = [{"type": "function", "function": f} for f in tool_functions(body)]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError("'prompt' (a string) or 'messages' is required", code="missing_required_parameter",
                           param="prompt")
        out["prompt"] = prompt
        out["add_special_tokens"] = get_bool(body, "add_special_tokens", True)
    return get_str(body, "model"), out


def parse_detokenize_request(body: dict) -> tuple[str | None, dict]:
    """vLLM's /detokenize: token ids -> (model, what the worker decodes)."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_token_id(t) for t in tokens):
        raise ApiError("'tokens' must be a list of token ids", code="invalid_type", param="tokens")
    return get_str(body, "model"), {"tokens": tokens}
