"""Structured outputs: a grammar per request, compiled by xgrammar, masks the logits of each step.

A request's `StructuredOutput` compiles (cached by xgrammar) into a grammar; its `GrammarMatcher`
follows the tokens generated so far and, before each sampling, fills a bitmask of the tokens that
keep the text a prefix of a match. Once the match is complete only the stop tokens remain allowed,
so the request ends with finish_reason "stop", as in vLLM. xgrammar is imported on the first such
request (it takes about a second), never by a worker that is not asked for one. A grammar compiles
on a thread of its own (`compile_async`; xgrammar releases the GIL), so a large schema (a 47K-character
one takes ~0.5 s) does not stall the streams already running.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import structlog
import torch

from services.worker.engine.api import InvalidRequest, StructuredKind, StructuredOutput

log = structlog.get_logger()

# JSON may hold whitespace between its tokens (pretty-printing); a run of it is capped at 16
# characters, or a model could pad forever.
MAX_JSON_WHITESPACE = 16
# Compiled grammars are cached (the same schema compiles once), least recently used out past this.
GRAMMAR_CACHE_BYTES = 64 << 20
# xgrammar's errors start with "[hh:mm:ss] /path/file.cc:line: "
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


class GrammarBackend:
    """Compiles structured outputs for one tokenizer and makes their matchers. Thread-safe."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._lock = threading.Lock()
        self._compiler = None
        self._executor: ThreadPoolExecutor | None = None

    def _load(self):
        with self._lock:
            if self._compiler is None:
                started = time.perf_counter()
                try:
                    import xgrammar
                except ImportError as e:
                    raise InvalidRequest("structured outputs need the xgrammar package on the worker "
                                         "(pip install xgrammar)", "response_format") from e
                info = xgrammar.TokenizerInfo.from_huggingface(
                    self._hf_tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
                log.info("grammar_backend_loaded", seconds=round(time.perf_counter() - started, 2))
            return self._compiler

    def matcher(self, structured: StructuredOutput) -> RequestGrammar:
        """A fresh matcher for one request; InvalidRequest (naming its field) if it does not compile."""
        compiler = self._load()
        import xgrammar

        try:
            compiled = _compile(compiler, structured)
        except RuntimeError as e:
            message = _CPP_PREFIX.sub("", str(e).strip()).strip()
            raise InvalidRequest(f"{structured.param}: the {structured.kind.value} does not compile: {message}",
                                 structured.param) from e
        return RequestGrammar(xgrammar.GrammarMatcher(compiled))

    def compile_async(self, structured: StructuredOutput) -> Future:
        """`matcher` on the compile thread: a Future of the RequestGrammar (or its InvalidRequest)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-grammar")
        return self._executor.submit(self.matcher, structured)


def _compile(compiler, structured: StructuredOutput):
    kind = structured.kind
    if kind is StructuredKind.JSON_OBJECT:
        return compiler.compile_json_schema('{"type": "object"}', max_whitespace_cnt=MAX_JSON_WHITESPACE)
    if kind is StructuredKind.JSON_SCHEMA:
        return compiler.compile_json_schema(structured.spec, max_whitespace_cnt=MAX_JSON_WHITESPACE)
    if kind is StructuredKind.REGEX:
        return compiler.compile_regex(structured.spec)
    if kind is StructuredKind.CHOICE:
        # EBNF string literals take JSON's escapes; non-ASCII characters stay as they are.
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                for c in structured.choices))
    return compiler.compile_grammar(structured.spec)


class RequestGrammar:
    """One request's grammar state: which tokens may come next, advanced by each sampled token."""

    def __init__(self, matcher):
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """False if the grammar does not allow it (the sampler had no allowed token to choose)."""
        return bool(self._matcher.accept_token(token_id))

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row ``row`` of ``bitmask`` [N, ceil(V / 32)] int32: bit t set where token t may come next."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def terminated(self) -> bool:
        """The match is complete and its stop token accepted: nothing may follow."""
        return bool(self._matcher.is_terminated())


def apply_grammars(logits: torch.Tensor, grammars: list[RequestGrammar | None]) -> None:
    """Disallowed tokens of each row with a grammar get -inf, in place. logits: [N, V] fp32 (CPU)."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(grammars), logits.shape[1])  # [N, ceil(V / 32)] int32
    for row in rows:
        grammars[row].fill(bitmask, row)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
