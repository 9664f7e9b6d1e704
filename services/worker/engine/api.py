"""The engine's public contract: what the worker service (and `kvmesh generate`) talk to.

Plain Python (no torch) so services and tests can build requests without a model.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class EngineError(Exception):
    """Base of request errors raised by the engine; `param` names the offending field."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(EngineError):
    code = "invalid_value"


class ContextLengthExceeded(EngineError):
    code = "context_length_exceeded"


class KVCapacityBusy(EngineError):
    """The request fits the cluster's KV capacity, but other sequences hold too much of it now: not
    a bad request (400) but a busy server; another worker, or a retry shortly, may take it."""

    status = 503
    code = "kv_capacity_busy"


class NotFound(EngineError):
    """What the request names (a LoRA adapter to unload) is not here."""

    status = 404
    code = "not_found"


class EngineOverloaded(EngineError):
    status = 503
    code = "overloaded"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # aborted by the caller
    ERROR = "error"  # the engine failed this request; see Delta.error


class StructuredKind(enum.Enum):
    """What a structured output's text must match (OpenAI's response_format, vLLM's structured_outputs)."""

    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # spec: a JSON schema (JSON text)
    REGEX = "regex"  # spec: a regular expression
    CHOICE = "choice"  # choices: exactly one of these strings
    GRAMMAR = "grammar"  # spec: an EBNF grammar (root rule `root`)


MAX_STRUCTURED_SPEC_CHARS = 1 << 16
MAX_CHOICES = 256


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """The generated text is constrained to a grammar: each step samples only tokens that keep it
    a prefix of a match, and the request ends (finish_reason "stop") once the match is complete."""

    kind: StructuredKind
    spec: str = ""
    choices: tuple[str, ...] = ()
    param: str = "response_format"  # the request field it came from: errors name it
    # A thinking model's reasoning markers (the router's --reasoning-parser), each one token of the
    # vocabulary: the grammar applies once the reasoning has ended, not to the reasoning itself.
    reasoning_start: str = ""
    reasoning_end: str = ""

    def to_obj(self) -> dict:
        return {"kind": self.kind.value, "spec": self.spec, "choices": list(self.choices), "param": self.param,
                "reasoning_start": self.reasoning_start, "reasoning_end": self.reasoning_end}

    @classmethod
    def from_obj(cls, obj) -> StructuredOutput:
        """The wire form back; InvalidRequest naming what is wrong."""
        if not isinstance(obj, dict):
            raise InvalidRequest("structured output must be an object with a 'kind'", "structured")
        try:
            kind = StructuredKind(obj.get("kind"))
        except ValueError:
            raise InvalidRequest(f"structured output kind must be one of {[k.value for k in StructuredKind]}, "
                                 f"got {obj.get('kind')!r}", "structured") from None
        spec, choices, param = obj.get("spec", ""), obj.get("choices") or (), obj.get("param", "response_format")
        start, end = obj.get("reasoning_start", ""), obj.get("reasoning_end", "")
        if not all(isinstance(x, str) for x in (spec, param, start, end, *choices)):
            raise InvalidRequest("structured output spec and choices must be strings", "structured")
        out = cls(kind, spec, tuple(choices), param, start, end)
        out.validate()
        return out

    def validate(self) -> None:
        if len(self.spec) > MAX_STRUCTURED_SPEC_CHARS:
            raise InvalidRequest(f"structured output spec must be at most {MAX_STRUCTURED_SPEC_CHARS} characters, "
                                 f"got {len(self.spec)}", self.param)
        if self.kind in (StructuredKind.JSON_SCHEMA, StructuredKind.REGEX, StructuredKind.GRAMMAR) and not self.spec:
            raise InvalidRequest(f"structured output {self.kind.value} needs a non-empty spec", self.param)
        if self.kind is StructuredKind.CHOICE:
            if not 1 <= len(self.choices) <= MAX_CHOICES or any(not c for c in self.choices):
                raise InvalidRequest(f"structured output choice needs 1 to {MAX_CHOICES} non-empty strings, "
                                     f"got {len(self.choices)}", self.param)
            if sum(map(len, self.choices)) > MAX_STRUCTURED_SPEC_CHARS:
                raise InvalidRequest(f"structured output choices must total at most {MAX_STRUCTURED_SPEC_CHARS} "
                                     "characters", self.param)


# Temperatures below this sample greedily (as vLLM): logits / 1e-300 overflow to inf, whose
# softmax is NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # alternatives per token (vLLM's default --max-logprobs)
MAX_CACHE_SALT_CHARS = 1024  # as vLLM


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or under GREEDY_BELOW_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k cut
    seed: int | None = None  # per-request generator: same seed, same tokens
    stop: tuple[str, ...] = ()  # stop strings; the matched string is not returned
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS / stop ids are suppressed until this many tokens exist
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus top-k alternatives
    # OpenAI's penalties on the tokens generated so far: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' / vLLM's, on every token of the prompt and the output: logit / p if > 0, else * p
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # sampling keeps tokens with probability >= min_p * the top token's
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), ids ascending
    allowed_token_ids: tuple[int, ...] = ()  # vLLM's: only these may be sampled; () allows every token
    truncate_prompt_tokens: int | None = None  # vLLM's: keep only the prompt's last k tokens
    bad_words: tuple[str, ...] = ()  # vLLM's: words never generated (engine.bad_words)
    skip_special_tokens: bool = True  # vLLM's: False puts special tokens' text (e.g. <|im_start|>) in the output
    include_stop_str_in_output: bool = False  # vLLM's: the text ends with the stop string it matched
    # The first delta starts with the prompt (its text, and with logprobs set its tokens' logprobs,
    # the first token's None), as OpenAI's completions `echo`.
    echo: bool = False
    # vLLM's: the first delta carries each prompt token's logprob given the ones before it, its
    # rank, and the top-k alternatives (k >= 0; None: off)
    prompt_logprobs: int | None = None
    return_token_ids: bool = False  # vLLM's: the first delta carries the prompt's token ids
    # vLLM's: prefix-cache blocks are shared only between requests with the same salt (engine.prefix_hash)
    cache_salt: str | None = None
    priority: int = 0  # vLLM's: with --scheduling-policy priority, lower numbers are served (and kept) first
    structured: StructuredOutput | None = None  # None: free text

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def scores_prompt(self) -> bool:
        """Every prompt position's logits are needed (no prefix-cache hit may skip one)."""
        return self.prompt_logprobs is not None or (self.echo and self.logprobs is not None)

    @property
    def prompt_top_k(self) -> int:
        """Alternatives kept per scored prompt token: enough for echo's logprobs and prompt_logprobs."""
        return max(self.prompt_logprobs or 0, (self.logprobs or 0) if self.echo else 0)

    @property
    def uses_history(self) -> bool:
        """Its logits depend on the tokens so far (penalties), carry a bias or allow only some tokens."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.allowed_token_ids)

    def validate(self) -> None:
        """Raise InvalidRequest naming the field and its limit."""
        if self.max_tokens < (0 if self.echo else 1):
            raise InvalidRequest(f"max_tokens must be at least 1 (0 only with echo), got {self.max_tokens}",
                                 "max_tokens")
        if not 0 <= self.temperature < math.inf:  # NaN fails too
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidRequest(f"top_k must be >= 1 (or unset), got {self.top_k}", "top_k")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InvalidRequest(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}", "min_tokens"
            )
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise InvalidRequest(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}",
                                 "truncate_prompt_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise InvalidRequest(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}", name)
        if self.cache_salt is not None and not 1 <= len(self.cache_salt) <= MAX_CACHE_SALT_CHARS:
            raise InvalidRequest(f"cache_salt must be 1 to {MAX_CACHE_SALT_CHARS} characters, "
                                 f"got {len(self.cache_salt)}", "cache_salt")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty", "stop")
        if any(not w.strip() for w in self.bad_words):
            raise InvalidRequest("bad_words must be non-empty words", "bad_words")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not self.repetition_penalty > 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        for token_id, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise InvalidRequest(f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}",
                                     "logit_bias")
        if self.structured is not None:
            self.structured.validate()

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids named by the request exist in the model's vocabulary."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("stop_token_ids", self.stop_token_ids),
                          ("allowed_token_ids", self.allowed_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequest(f"{name} token ids must be in [0, {vocab_size}), got {bad[:5]}", name)


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """Exactly one of prompt (text), prompt_token_ids or messages (chat, rendered with the model's
    chat template, generation prompt appended) is set."""

    request_id: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict, ...] | None = None
    tools: tuple[dict, ...] | None = None  # with messages: OpenAI tools the chat template renders
    # with messages: the chat template's variables (e.g. enable_thinking), add_generation_prompt and
    # continue_final_message (transformers' apply_chat_template arguments)
    chat_template_kwargs: dict | None = None
    lora_name: str | None = None  # the LoRA adapter (EngineConfig.lora_modules) it runs with; None: the base model


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None  # None: the prompt's first token (nothing before it to predict it)
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, token text, logprob), best first
    rank: int | None = None  # scored prompt tokens: 1 + how many tokens were more likely


@dataclass(frozen=True, slots=True)
class Delta:
    """One step's output for one request. Concatenating every `text` gives the decode of all
    generated ids (minus a matched stop string); `text` never splits a UTF-8 character."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    num_prompt_tokens: int
    num_generated_tokens: int  # total so far, including this delta
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    error: str | None = None  # set with FinishReason.ERROR
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # The first delta, when the request asked: the prompt's ids (return_token_ids), and its tokens'
    # logprobs (prompt_logprobs; the first token's is None, tops cut to prompt_logprobs)
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it (None: EOS)


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    # speculative decoding since start: tokens proposed, and those the model agreed with
    num_spec_proposed: int = 0
    num_spec_accepted: int = 0
    # KV blocks we hold on memory servers: all of them, and those only cached (no sequence uses them)
    num_remote_blocks: int = 0
    num_remote_cached_blocks: int = 0
    num_preemptions: int = 0  # sequences preempted for recompute since start
