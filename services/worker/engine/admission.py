"""Admission: a request becomes an ActiveRequest (its Sequence and per-request state) once
tokenized and checked against the engine's limits; and vLLM's /tokenize. Any thread."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.worker.engine.api import (ContextLengthExceeded, GenerateRequest, InvalidRequest, KVCapacityBusy,
                                        StructuredOutput)
from services.worker.engine.bad_words import bad_word_ids
from services.worker.engine.config import EngineConfig
from services.worker.engine.detokenizer import IncrementalDetokenizer
from services.worker.engine.logits_processors import TokenHistory
from services.worker.engine.remote import RemoteKV
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.sequence import Sequence
from services.worker.engine.spec_decode import NgramIndex, SpeculativeConfig, speculates
from services.worker.engine.structured import GrammarBackend, RequestGrammar
from services.worker.model.config import ModelConfig
from services.worker.model.lora import LoRAAdapter
from services.worker.model.tokenizer import Tokenizer


@dataclass(eq=False, slots=True)
class ActiveRequest:
    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    echo_text: str | None = None  # the prompt as the first delta echoes it
    history: TokenHistory | None = None  # penalties' view of its tokens, made at its first sampling
    grammar: RequestGrammar | None = None  # its structured output's state
    grammar_waits_for: int | None = None  # the token that ends the reasoning, before the grammar applies
    bad_words: tuple[tuple[int, ...], ...] = ()  # its bad_words' spellings in tokens (engine.bad_words)
    ngram: NgramIndex | None = None  # speculative decoding: where its n-grams occurred (None: it does not speculate)


class Admission:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, tokenizer: Tokenizer, grammars: GrammarBackend,
                 scheduler: Scheduler, remote: RemoteKV | None, max_model_len: int,
                 adapters: dict[str, LoRAAdapter], speculative: SpeculativeConfig | None):
        self.config, self.model_config, self.tokenizer, self.grammars = config, model_config, tokenizer, grammars
        self.scheduler, self.remote, self.max_model_len = scheduler, remote, max_model_len
        self.adapters = adapters  # the runner's: loads and unloads show at once
        self.speculative = speculative
        self._rng = random.Random(config.seed)

    def prepare(self, request: GenerateRequest, grammar: RequestGrammar | None = None) -> ActiveRequest:
        """Tokenize and validate; raises EngineError subclasses naming the value and the limit.
        grammar: the request's structured output, compiled already (`grammars.compile_async`);
        None compiles it here."""
        params = request.sampling
        params.validate()
        params.check_token_ids(self.model_config.vocab_size)
        if params.priority and self.config.scheduling_policy != "priority":  # as vLLM
            raise InvalidRequest("priority needs the worker started with --scheduling-policy priority", "priority")
        if request.lora_name is not None and request.lora_name not in self.adapters:
            raise InvalidRequest(f"the LoRA adapter {request.lora_name!r} is not loaded here; loaded: "
                                 f"{sorted(self.adapters)}", "model")
        ids = self._prompt_ids(request)
        truncated = params.truncate_prompt_tokens is not None and len(ids) > params.truncate_prompt_tokens
        if truncated:  # vLLM's: keep the last k tokens (a chat's, after its template)
            ids = ids[-params.truncate_prompt_tokens:]
        self._check_fits(len(ids), params.max_tokens)
        if params.structured is not None and grammar is None:
            grammar = self.grammars.matcher(params.structured)
        waits_for = self._reasoning_end(params.structured, ids) if params.structured is not None else None
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        generator = None if params.greedy else torch.Generator().manual_seed(seed)
        seq = Sequence(request.request_id, ids, params, arrival=0,
                       lora=self.adapters[request.lora_name] if request.lora_name is not None else None)
        echo_text = None
        if params.echo:
            echo_text = request.prompt if request.prompt is not None and not truncated else self.tokenizer.decode(ids)
        decode: Callable = self.tokenizer.decode if params.skip_special_tokens else self._decode_with_special_tokens
        detok = IncrementalDetokenizer(decode, params.stop, params.include_stop_str_in_output)
        bad_words = bad_word_ids(params.bad_words, self._encode_word) if params.bad_words else ()
        spec = self.speculative
        ngram = NgramIndex(spec.prompt_lookup_min, spec.prompt_lookup_max) if spec and speculates(params) else None
        return ActiveRequest(seq, detok, generator, echo_text,
                             grammar=grammar, grammar_waits_for=waits_for, bad_words=bad_words, ngram=ngram)

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            if not request.messages:
                raise InvalidRequest("messages must not be empty", "messages")
            ids = self.tokenizer.encode_chat(list(request.messages), request.tools, request.chat_template_kwargs)
        elif request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            vocab = self.model_config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
        elif request.prompt is not None:
            ids = self.tokenizer.encode(request.prompt)
        else:
            raise InvalidRequest("one of prompt, prompt_token_ids or messages is required", "prompt")
        if not ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        return ids

    def _check_fits(self, num_prompt: int, max_tokens: int) -> None:
        total = num_prompt + max_tokens
        if total > self.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens; the request "
                f"needs {total} ({num_prompt} prompt + {max_tokens} max_tokens)",
                "max_tokens",
            )
        if not self.scheduler.fits_ever(total):
            blocks = self.scheduler.blocks
            local = blocks.num_blocks * blocks.block_size
            remote = self.scheduler.remote.room() * blocks.block_size
            needs = f"the request needs {total} ({num_prompt} prompt + {max_tokens} max_tokens)"
            if self.remote is None:
                raise ContextLengthExceeded(f"the KV cache holds {local} tokens; {needs}", "max_tokens")
            capacity = self.scheduler.remote.capacity() * blocks.block_size
            if self.scheduler.fits_capacity(total):
                # Other sequences hold the room it needs; they end, and free it.
                raise KVCapacityBusy(
                    f"the cluster's KV cache is busy: {needs}, and it holds {local} tokens here plus {capacity} "
                    f"on memory servers, but only {remote} of those are free now; retry shortly",
                    "max_tokens",
                )
            raise ContextLengthExceeded(
                f"the KV cache holds {local} tokens here plus {remote} free on memory servers (of {capacity} there); "
                f"{needs}",
                "max_tokens",
            )

    def _encode_word(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _decode_with_special_tokens(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def _reasoning_end(self, structured: StructuredOutput, prompt_ids: list[int]) -> int | None:
        """The id of the token ending a thinking model's reasoning, while the grammar must wait
        for it: None when there are no markers, or when the prompt already closed the reasoning
        (a template that turns thinking off writes an empty <think></think>)."""
        if not structured.reasoning_end:
            return None
        ids = [self.tokenizer.single_token_id(m) for m in (structured.reasoning_start, structured.reasoning_end)]
        for marker, token_id in zip((structured.reasoning_start, structured.reasoning_end), ids):
            if marker and token_id is None:
                raise InvalidRequest(f"{structured.param}: a structured output after the reasoning needs {marker!r} "
                                     "to be one token of this model's vocabulary, and it is not", structured.param)
        start_id, end_id = ids

        def last(token_id):
            return max((i for i, t in enumerate(prompt_ids) if t == token_id), default=-1)

        return None if last(end_id) > (last(start_id) if start_id is not None else -1) else end_id

    def tokenize(self, request: dict) -> dict:
        """vLLM's /tokenize and /detokenize, from the router's checked body: {"tokens": [...]} ->
        {"prompt": text}; {"prompt": text, "add_special_tokens"} or {"messages", "tools",
        "chat_template_kwargs"} -> {"tokens", "count", "max_model_len"} (and "token_strs" when
        "return_token_strs")."""
        if "tokens" in request:
            ids = list(request["tokens"])
            vocab = self.model_config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequest(f"tokens must be ids in [0, {vocab})", "tokens")
            return {"prompt": self.tokenizer.hf.decode(ids)}
        if request.get("messages") is not None:
            ids = self.tokenizer.encode_chat(list(request["messages"]), request.get("tools"),
                                             request.get("chat_template_kwargs"))
        else:
            ids = self.tokenizer.encode(request["prompt"], request.get("add_special_tokens", True))
        out = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": None}
        if request.get("return_token_strs"):
            out["token_strs"] = self.tokenizer.hf.convert_ids_to_tokens(ids)
        return out
