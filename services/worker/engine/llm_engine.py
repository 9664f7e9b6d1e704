"""The synchronous engine: one scheduling step at a time, sampling, detokenization (admission:
engine.admission).

Thread model: `prepare` may run on any thread; `submit` and `abort` only queue work (thread-safe);
`step` (and everything it touches) runs on one thread at a time.
"""

from __future__ import annotations

import itertools
from collections import deque

import structlog
import torch

from services.worker.engine.admission import ActiveRequest, Admission
from services.worker.engine.api import (
    Delta,
    EngineStats,
    FinishReason,
    GenerateRequest,
    InvalidRequest,
    NotFound,
    TokenLogprob,
)
from services.worker.engine.bad_words import banned_next
from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig, resolve_max_model_len
from services.worker.engine.logits_processors import TokenHistory
from services.worker.engine.model_runner import ModelRunner
from services.worker.engine.prompt_scoring import positions_to_score, prompt_entries, score_prompts
from services.worker.engine.remote import MemserverLost, RemoteKV, SpillFailed
from services.worker.engine.sampler import SampleFailed, SampleResult, sample, sample_proposed
from services.worker.engine.scheduler import Scheduler, SpillPlan
from services.worker.engine.sequence import Sequence, SeqStatus
from services.worker.engine.spec_decode import SpeculativeConfig, SpecStats, merge_deltas
from services.worker.engine.structured import GrammarBackend, RequestGrammar, apply_grammars
from services.worker.model.generation_defaults import sampling_defaults
from services.worker.model.lora import LoRAError
from services.worker.model.tiny import resolve_model_dir
from services.worker.model.tokenizer import Tokenizer

log = structlog.get_logger()

_RELEASE_WAIT_S = 30.0
# A sequence whose spill was refused waits this long before it is admitted again, doubling with
# each refusal in a row up to the max (engine._back_off)
_SPILL_BACKOFF_S = 0.05
_MAX_SPILL_BACKOFF_S = 1.0


class LLMEngine:
    def __init__(self, config: EngineConfig, remote: RemoteKV | None = None):
        self.config = config
        self.remote = remote
        model_dir = resolve_model_dir(config.model)
        self.runner = ModelRunner(config, model_dir)
        self.model_config = self.runner.model_config
        self.tokenizer = Tokenizer(model_dir, self.model_config.eos_token_ids, config.chat_template)
        self.grammars = GrammarBackend(self.tokenizer.hf, self.model_config.vocab_size, self.tokenizer.eos_token_ids)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.blocks, config.max_num_seqs, config.max_num_batched_tokens,
            remote_free_blocks=remote.free_blocks if remote is not None else None,
            spill_batch=max(4, self.blocks.num_blocks // 8), by_priority=config.scheduling_policy == "priority",
            remote_reclaimable=remote.reclaimable_blocks if remote is not None else None,
            remote_take_reclaim=remote.take_reclaim if remote is not None else None,
            remote_capacity=remote.capacity_blocks if remote is not None else None,
        )
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.model_config.max_model_len)
        # What a request that leaves a sampling field unset gets (the worker front applies them)
        self.sampling_defaults = sampling_defaults(config.generation_config, model_dir)
        self.model_name = config.model
        self.speculative = SpeculativeConfig.parse(config.speculative_config) if config.speculative_config else None
        self.spec_stats = SpecStats()
        self.admission = Admission(config, self.model_config, self.tokenizer, self.grammars, self.scheduler, remote,
                                   self.max_model_len, self.runner.adapters, self.speculative)
        self._active: dict[str, ActiveRequest] = {}
        self._arrivals = itertools.count()
        self._inbox: deque[ActiveRequest] = deque()
        self._aborts: deque[str] = deque()

    @property
    def kv_geometry(self) -> dict:
        """What a memory server needs to hold our blocks (see runner.gather_blocks)."""
        cfg = self.model_config
        return {"num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                "num_heads": cfg.num_heads, "block_size": self.blocks.block_size,
                "dtype": str(self.runner.kv_dtype).removeprefix("torch."),
                "compute_dtype": str(self.runner.dtype).removeprefix("torch.")}

    # --- admission (any thread) ---
    def prepare(self, request: GenerateRequest, grammar: RequestGrammar | None = None) -> ActiveRequest:
        """Admission.prepare: tokenized and checked, ready to submit."""
        return self.admission.prepare(request, grammar)

    def tokenize(self, request: dict) -> dict:
        return self.admission.tokenize(request)

    @property
    def lora_modules(self) -> dict[str, str]:
        """The LoRA adapters requests may name: name -> directory."""
        return {name: adapter.path for name, adapter in self.runner.adapters.items()}

    def load_lora(self, name: str, path: str) -> dict[str, str]:
        """vLLM's /v1/load_lora_adapter (step thread, between steps); returns lora_modules."""
        try:
            self.runner.load_lora(name, path)
        except LoRAError as e:
            raise InvalidRequest(str(e), "lora_path") from e
        log.info("lora_loaded", lora_name=name, lora_path=path)
        return self.lora_modules

    def unload_lora(self, name: str) -> dict[str, str]:
        """vLLM's /v1/unload_lora_adapter: new requests may no longer name it; those admitted
        already finish with it. Returns lora_modules."""
        if self.runner.adapters.pop(name, None) is None:
            raise NotFound(f"the LoRA adapter {name!r} is not loaded here; loaded: {sorted(self.runner.adapters)}",
                           "lora_name")
        log.info("lora_unloaded", lora_name=name)
        return self.lora_modules

    def submit(self, active: ActiveRequest) -> None:
        self._inbox.append(active)

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)

    def active_request_ids(self) -> list[str]:
        return [*self._active, *(a.seq.request_id for a in self._inbox)]

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self.scheduler.has_work())

    def ready_in(self) -> float:
        """Seconds until step() has something to do, when has_work(): 0 unless every waiting
        sequence backs off after a refused spill (a loop that steps then would only spin)."""
        return 0.0 if self._inbox or self._aborts else self.scheduler.ready_in()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._inbox),
            num_free_blocks=self.blocks.num_free_blocks,
            num_total_blocks=self.blocks.num_blocks,
            block_size=self.blocks.block_size,
            num_spec_proposed=self.spec_stats.num_proposed,
            num_spec_accepted=self.spec_stats.num_accepted,
            num_remote_blocks=self.scheduler.remote.cache.num_blocks,
            num_remote_cached_blocks=self.scheduler.remote.cache.num_evictable,
            num_preemptions=self.scheduler.num_preemptions,
        )

    # --- the step (one thread) ---
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        try:
            return self._step()
        finally:
            self._free_released()  # remote blocks of finished, aborted or preempted sequences

    def _step(self) -> list[Delta]:
        deltas = self._drain_inbox()
        self._recover_lost_memservers(deltas)
        out = self.scheduler.schedule()
        self._spill(out.spills, deltas)
        chunks = [c for c in out.chunks if c.seq.status is SeqStatus.RUNNING]
        scored = [positions_to_score(c) for c in chunks]
        try:
            logits = self.runner.execute(chunks, self.remote, scored) if chunks else None
        except MemserverLost as e:
            # KV written by this partial pass is rewritten when the chunks run again.
            log.warning("memserver_lost", memserver=e.memserver_id, error=str(e))
            self._recompute_sequences_on({e.memserver_id}, deltas)
            logits = None
        if logits is None:
            return deltas
        sampled = [c for c in chunks if c.samples]
        for chunk in chunks:
            # Proposed tokens count as computed once the model agrees with them (_advance_proposed).
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens - chunk.num_proposed
            self.scheduler.cache_computed(chunk.seq)
        num_rows = sum(1 + c.num_proposed for c in sampled)
        score_prompts(chunks, scored, logits[num_rows:])
        logits = logits[:num_rows]
        if any(c.seq.sampling.max_tokens == 0 for c in sampled):  # echo, max_tokens 0: scored, nothing to generate
            # (such a request never speculates: one row each)
            deltas += [self._end_echo_only(self._active[c.seq.request_id]) for c in sampled
                       if c.seq.sampling.max_tokens == 0]
            rows = [i for i, c in enumerate(sampled) if c.seq.sampling.max_tokens]
            logits, sampled = logits[rows], [sampled[i] for i in rows]
        if sampled:
            deltas += self._sample(sampled, logits)
            self._propose()
        return deltas

    def _sample(self, sampled: list, logits: torch.Tensor) -> list[Delta]:
        """The next tokens of the sampling chunks (logits: their rows, 1 + num_proposed each, in
        order): plain rows and greedy checks of proposals in one batched `sample`, a sampled
        request's proposals apart (sample_proposed)."""
        actives = [self._active[c.seq.request_id] for c in sampled]
        counts = [1 + c.num_proposed for c in sampled]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        apart = [n > 1 and not a.seq.sampling.greedy for a, n in zip(actives, counts)]
        batched = [(a, n) for a, n, skip in zip(actives, counts, apart) if not skip]
        rows = [r for start, n, skip in zip(starts, counts, apart) if not skip for r in range(start, start + n)]
        grammars = [a.grammar if a.grammar_waits_for is None else None for a, n in batched for _ in range(n)]
        results = iter(sample(
            logits[rows] if len(rows) < len(logits) else logits,
            [a.seq.sampling for a, n in batched for _ in range(n)],
            [a.generator for a, n in batched for _ in range(n)],
            [self._banned(a) for a, n in batched for _ in range(n)],
            [self._history(a) if a.seq.sampling.uses_history else None for a, n in batched for _ in range(n)],
            constrain=(lambda x: apply_grammars(x, grammars)) if any(grammars) else None,
        ) if rows else ())
        deltas = []
        for active, chunk, start, n, skip in zip(actives, sampled, starts, counts, apart):
            if n == 1:
                deltas.append(self._advance(active, next(results)))
                continue
            proposed = active.seq.spec_token_ids[:chunk.num_proposed]
            taken = (sample_proposed(logits[start:start + n], active.seq.sampling, active.generator, proposed)
                     if skip else [next(results) for _ in range(n)])
            deltas.append(self._advance_proposed(active, chunk, taken))
        return deltas

    def _advance_proposed(self, active: ActiveRequest, chunk, results: list) -> Delta:
        """A sequence that checked proposed tokens: the tokens taken at each row (greedy: the
        model's own; sampled: sample_proposed's), up to and including the first that differs from
        the proposal (spec_decode). One delta."""
        seq = active.seq
        proposed = seq.spec_token_ids[:chunk.num_proposed]
        taken = []
        for i, result in enumerate(results):
            taken.append(result)
            if isinstance(result, SampleFailed) or i == len(proposed) or result.token_id != proposed[i]:
                break
        num_accepted = len(taken) - 1
        self.spec_stats.record(len(proposed), num_accepted)
        base = seq.num_tokens
        out = []
        for result in taken:
            out.append(self._advance(active, result))
            if out[-1].finish_reason is not None:
                return merge_deltas(out)
        seq.num_computed_tokens = base + num_accepted  # the accepted tokens' K/V was computed from them
        self.scheduler.cache_computed(seq)
        return merge_deltas(out)

    def _propose(self) -> None:
        """Proposed tokens for the next step of each decoding sequence that speculates."""
        cap = self.speculative.disable_by_batch_size if self.speculative is not None else None
        busy = cap is not None and len(self.scheduler.running) > cap
        for seq in self.scheduler.running:
            seq.spec_token_ids = []
            active = self._active.get(seq.request_id)
            if busy:
                continue
            if active is None or active.ngram is None or seq.num_uncomputed_tokens != 1:
                continue
            room = min(self.speculative.num_speculative_tokens, seq.sampling.max_tokens - len(seq.output_token_ids) - 1,
                       self.max_model_len - seq.num_tokens)
            if room < 1:
                continue
            index = active.ngram
            index.extend(seq.token_ids(len(index.tokens), seq.num_tokens))
            seq.spec_token_ids = index.propose(room)

    def _history(self, active: ActiveRequest) -> TokenHistory:
        if active.history is None:
            active.history = TokenHistory(self.model_config.vocab_size, active.seq.prompt_token_ids)
        return active.history.update(active.seq.output_token_ids)

    def _end_echo_only(self, active: ActiveRequest) -> Delta:
        seq = active.seq
        text, logprobs = self._echo(active, "", None)
        self._retire(seq)
        return Delta(seq.request_id, (), text, seq.num_prompt_tokens, 0, FinishReason.LENGTH, logprobs,
                     num_cached_tokens=seq.num_cached_tokens, **self._prompt_fields(seq))

    def _echo(self, active: ActiveRequest, text: str, logprobs):
        """The first delta of an echo request: the prompt's text (and logprobs) before its own."""
        k = active.seq.sampling.logprobs
        if k is not None:
            logprobs = (*prompt_entries(active.seq, self.tokenizer.token_text, k), *(logprobs or ()))
        return active.echo_text + text, logprobs

    def _prompt_fields(self, seq: Sequence) -> dict:
        """What the first delta says of the prompt, when asked: its ids, its tokens' logprobs."""
        params, out = seq.sampling, {}
        if params.return_token_ids:
            out["prompt_token_ids"] = tuple(seq.prompt_token_ids)
        if params.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_entries(seq, self.tokenizer.token_text, params.prompt_logprobs)
        return out

    def _spill(self, plans: list[SpillPlan], deltas: list[Delta]) -> None:
        # Runs before the forward pass reuses the freed blocks: the gather copies them first.
        if plans and self.scheduler.remote.num_evicted_for_spill:
            self._free_released(wait=True)  # the room the spills borrow is the evicted blocks'; free it first
        for plan in plans:
            if not plan.valid:
                continue
            seq = plan.seq
            near = tuple(dict.fromkeys(span.memserver_id for span in seq.remote_spans))
            # What it needs there at most: its whole length, less what is here and what is there.
            held = len(seq.block_ids) + plan.start_token // self.blocks.block_size
            need = self.blocks.blocks_for(seq.num_prompt_tokens + seq.sampling.max_tokens) - held
            try:
                spans = self.remote.spill(seq.request_id, self.runner.gather_blocks(plan.block_ids), plan.start_token,
                                          near, max(need, len(plan.block_ids)))
            except SpillFailed as e:
                # Said once a run of refusals: under memory pressure a sequence may try many times.
                (log.warning if not seq.num_spill_refusals else log.debug)(
                    "spill_failed", request_id=seq.request_id, num_blocks=len(plan.block_ids), error=str(e))
                # Our cached blocks may be what stood in the way (a stale free count, a per-owner cap):
                # the sequence's next try finds their room.
                self.scheduler.remote.give_up(len(plan.block_ids))
                self._recompute(seq, deltas)  # its spilled blocks are gone
                self._back_off(seq)
                continue
            seq.num_spill_refusals = 0
            seq.remote_spans.extend(spans)
            self.scheduler.remote.stored(spans, seq.block_hashes)
            log.debug("blocks_spilled", request_id=seq.request_id, num_blocks=len(plan.block_ids),
                      memservers=sorted({s.memserver_id for s in spans}))

    def _recover_lost_memservers(self, deltas: list[Delta]) -> None:
        if self.remote is not None:
            lost = self.remote.lost_memservers()
            if lost:
                self._recompute_sequences_on(lost, deltas)

    def _recompute_sequences_on(self, memserver_ids: set[str], deltas: list[Delta]) -> None:
        self.scheduler.remote.forget(memserver_ids)
        for seq in list(self.scheduler.running):
            if any(span.memserver_id in memserver_ids for span in seq.remote_spans):
                log.warning("sequence_recomputed", request_id=seq.request_id, memservers=sorted(memserver_ids))
                self._recompute(seq, deltas, memserver_ids)

    def _recompute(self, seq: Sequence, deltas: list[Delta], lost: set[str] = frozenset()) -> None:
        """Back to the queue to recompute its KV from its tokens, if the cluster can still hold it.
        After a refused spill (nothing lost), that is its capacity: other sequences hold the room
        now, and it waits for them to end rather than fail."""
        # Its own blocks on surviving servers are about to be freed: they count as room too (the
        # free-blocks hint still has them as lent).
        own = sum(len(s.block_ids) for s in seq.remote_spans if s.memserver_id not in lost)
        self.scheduler.preempt(seq)
        total = seq.num_prompt_tokens + seq.sampling.max_tokens
        if not lost and self.scheduler.fits_capacity(total):
            return
        if not self.scheduler.fits_ever(total, extra_blocks=own):
            capacity = self.blocks.num_blocks + own + self.scheduler.remote.room()
            reason = (f"the cluster lost KV capacity: this sequence needs {total} tokens, "
                      f"{capacity * self.blocks.block_size} remain")
            log.warning("sequence_failed", request_id=seq.request_id, reason=reason)
            deltas.append(self._end(seq, FinishReason.ERROR, reason))

    def _back_off(self, seq: Sequence) -> None:
        """After a refused spill it waits 50 ms, doubling with each refusal in a row up to 1 s, before
        it is admitted again: each try recomputes the KV it had spilled (a 1,500-token request
        tried ~7 times a second in a chaos run). It keeps refusing within the heartbeat timeout,
        so the ledger keeps asking other workers for the room their cached blocks hold."""
        seq.num_spill_refusals += 1
        seq.admit_after = self.scheduler.clock() + min(_MAX_SPILL_BACKOFF_S,
                                                       _SPILL_BACKOFF_S * 2 ** (seq.num_spill_refusals - 1))

    def _free_released(self, wait: bool = False) -> None:
        holdings = self.scheduler.remote
        released, holdings.released = holdings.released, []
        if released and self.remote is not None:
            done = self.remote.release(released)
            try:
                if wait:
                    done.result(timeout=_RELEASE_WAIT_S)
            except TimeoutError:  # a spill may then be refused, and its sequence recomputed
                log.warning("release_slow", num_blocks=sum(len(s.block_ids) for s in released))

    def tend(self) -> None:
        """While nothing runs, what a step does when busy: let go of cached blocks on lost or
        leaving memory servers (a leaving server waits on them), and of those other workers need."""
        self._recover_lost_memservers([])
        self.scheduler.remote.answer_reclaim()
        self._free_released()

    def reset_prefix_cache(self) -> dict[str, int]:
        """vLLM's /reset_prefix_cache (step thread, between steps): forget the cached KV nobody
        uses, here and on memory servers (freed there before this returns)."""
        num_local, num_remote = self.scheduler.reset_prefix_cache()
        self._free_released(wait=True)
        log.info("prefix_cache_reset", num_local_blocks=num_local, num_remote_blocks=num_remote)
        return {"num_local_blocks": num_local, "num_remote_blocks": num_remote}

    def _drain_inbox(self) -> list[Delta]:
        while self._inbox:
            active = self._inbox.popleft()
            active.seq.arrival = next(self._arrivals)
            self._active[active.seq.request_id] = active
            self.scheduler.add(active.seq)
        deltas = []
        while self._aborts:
            active = self._active.get(self._aborts.popleft())
            if active is not None:
                deltas.append(self._end(active.seq, FinishReason.ABORT))
        return deltas

    def _retire(self, seq: Sequence) -> None:
        """It ends: its blocks go back, the engine forgets it."""
        self.scheduler.finish(seq)
        del self._active[seq.request_id]

    def _end(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> Delta:
        """Retire it with a last delta that carries no token."""
        self._retire(seq)
        return Delta(seq.request_id, (), "", seq.num_prompt_tokens, len(seq.output_token_ids), reason, error=error,
                     num_cached_tokens=seq.num_cached_tokens)

    def _banned(self, active: ActiveRequest) -> tuple[int, ...]:
        seq = active.seq
        banned = banned_next(active.bad_words, seq.output_token_ids) if active.bad_words else ()
        if len(seq.output_token_ids) >= seq.sampling.min_tokens:
            return banned
        return banned + tuple(seq.sampling.stop_token_ids) + self.tokenizer.eos_token_ids

    def _advance(self, active: ActiveRequest, result: SampleResult | SampleFailed) -> Delta:
        seq, params = active.seq, active.seq.sampling
        if isinstance(result, SampleFailed):
            log.warning("sampling_failed", request_id=seq.request_id, error=result.error)
            return self._end(seq, FinishReason.ERROR, result.error)
        token = result.token_id
        grammar = active.grammar if active.grammar_waits_for is None else None
        if active.grammar_waits_for == token:  # the reasoning has ended: the grammar applies from the next token
            active.grammar_waits_for = None
        if grammar is not None and not grammar.accept(token):
            # The sampler only picks allowed tokens (a row with none fails there): a guard, so a
            # disagreement between mask and matcher ends the request instead of breaking its grammar.
            return self._end(seq, FinishReason.ERROR, f"{params.structured.param}: no token the grammar allows "
                                                      f"could be sampled (token {token} is not allowed)")
        seq.output_token_ids.append(token)
        finish = stop_reason = None  # stop_reason (vLLM's): the stop token id or string that ended it
        if token in params.stop_token_ids:
            finish, stop_reason = FinishReason.STOP, token
        elif not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            finish = FinishReason.STOP
        elif grammar is not None and grammar.terminated:  # its stop token, despite ignore_eos
            finish = FinishReason.STOP
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            finish = FinishReason.LENGTH
        text_ids = seq.output_token_ids[:-1] if finish is FinishReason.STOP else seq.output_token_ids
        text = active.detok.step(text_ids, final=finish is not None)
        if active.detok.stopped and finish is None:
            finish, stop_reason = FinishReason.STOP, active.detok.matched
        logprobs = None
        if params.logprobs is not None:
            tok = self.tokenizer.token_text
            top = tuple((i, tok(i), lp) for i, lp in result.top)
            logprobs = (TokenLogprob(token, tok(token), result.logprob, top),)
        first = {}
        if len(seq.output_token_ids) == 1:
            if params.echo:
                text, logprobs = self._echo(active, text, logprobs)
            first = self._prompt_fields(seq)
        if finish is not None:
            self._retire(seq)
        return Delta(
            seq.request_id, (token,), text, seq.num_prompt_tokens, len(seq.output_token_ids), finish, logprobs,
            num_cached_tokens=seq.num_cached_tokens, stop_reason=stop_reason, **first,
        )

    def fail_all(self, reason: str) -> list[Delta]:
        """After an unexpected step failure: end every request with an error, free every block."""
        deltas = [self._end(active.seq, FinishReason.ERROR, reason) for active in list(self._active.values())]
        self._free_released()
        return deltas
