"""Owns the model and its paged KV cache; turns scheduled chunks into one forward pass."""

from __future__ import annotations

import itertools

import torch

from kernels import plan_paged_attention
from services.runtime.host import run_on_threads
from services.worker.engine.config import EngineConfig
from services.worker.engine.remote import RemoteKV
from services.worker.engine.remote_attention import StepRemoteAttention
from services.worker.engine.scheduler import ScheduledChunk
from services.worker.model.attention import AttentionMetadata
from services.worker.model.config import ModelConfig, load_model_config
from services.worker.model.loader import load_model, resolve_dtype
from services.worker.model.lora import LoRAAdapter, LoRABatch, LoRAError, load_adapter

# --kv-cache-dtype: 8-bit floats with scale 1, as vLLM's without calibrated scales ("auto": the model's dtype)
_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB: plenty for the embedded model; set kv_cache_bytes for more


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * element


def default_num_blocks(cfg: ModelConfig, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    budget = config.kv_cache_bytes
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * 0.8)
        else:
            budget = DEFAULT_CPU_KV_BYTES
    return max(1, budget // kv_bytes_per_block(cfg, config.block_size, dtype))


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir):
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        self.num_threads = torch.get_num_threads()
        self.logits_threads = config.logits_threads if self.device.type == "cpu" else None
        self.model_config = load_model_config(model_dir)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        self.kv_dtype = _KV_DTYPES.get(config.kv_cache_dtype, self.dtype)  # what the cache holds
        self.model = load_model(model_dir, self.dtype, self.device)
        self.block_size = config.block_size
        self.num_blocks = default_num_blocks(self.model_config, config, self.kv_dtype, self.device)
        cfg = self.model_config
        # Zero-filled: the CPU attention path reads whole blocks and masks the unused tail, and
        # 0 * garbage could be NaN.
        self.kv_cache = torch.zeros(
            cfg.num_layers, 2, self.num_blocks, config.block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=self.kv_dtype, device=self.device,
        )
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(cfg.num_layers)]
        self.max_lora_rank = config.max_lora_rank
        self._lora_loads = itertools.count()
        self.adapters: dict[str, LoRAAdapter] = {}
        for name, path in config.lora_modules:
            self.load_lora(name, path)

    def load_lora(self, name: str, path: str) -> LoRAAdapter:
        """Load a PEFT adapter as `name` (LoRAError says what is wrong with it)."""
        if name in self.adapters:
            raise LoRAError(f"the LoRA adapter {name!r} is already loaded (from {self.adapters[name].path!r})")
        adapter = load_adapter(name, path, self.model_config, self.max_lora_rank, self.device,
                               cache_key=f"{name}#{next(self._lora_loads)}")
        self.adapters[name] = adapter
        return adapter

    def gather_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of local blocks for spilling: [num_layers, 2, n, block_size, num_kv_heads, head_dim]."""
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        if self.kv_cache.element_size() == 1:  # fp8: bytes, which index_select takes on every device
            return self.kv_cache.view(torch.uint8).index_select(2, ids).view(self.kv_cache.dtype)
        return self.kv_cache.index_select(2, ids)

    def execute(self, chunks: list[ScheduledChunk], remote: RemoteKV | None = None,
                scored: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
        """Run one forward pass; returns fp32 logits [sampled rows + scored positions, vocab]: per
        sampling chunk in chunk order its last token's row and one per proposed token it checks
        (1 + chunk.num_proposed rows), then per chunk the positions [lo, hi) of ``scored``."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        bs = self.block_size
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            input_ids.extend(seq.token_ids(start, end))
            positions.extend(range(start, end))
            # Local blocks hold tokens from num_remote_tokens on (older ones were spilled).
            blocks, offset = seq.block_ids, seq.num_remote_tokens
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start - offset, end - offset))
            query_start.append(len(input_ids))
            context_lens.append(end - offset)
            if chunk.samples:
                sample_rows.extend(range(len(input_ids) - 1 - chunk.num_proposed, len(input_ids)))
        score_rows = [query_start[i] + p - c.start for i, (c, span) in enumerate(zip(chunks, scored or ()))
                      if span is not None for p in range(*span)]
        max_blocks = max(len(c.seq.block_ids) for c in chunks)
        tables = [c.seq.block_ids + [0] * (max_blocks - len(c.seq.block_ids)) for c in chunks]
        # Checked on the host list once (no device read), so the layers' stores need not.
        if slots and (min(slots) < 0 or max(slots) >= self.num_blocks * bs):
            raise ValueError(f"slot_mapping out of range [0, {self.num_blocks * bs}): {min(slots)}..{max(slots)}")
        dev = self.device
        block_tables = torch.tensor(tables, dtype=torch.int32, device=dev)
        lens = torch.tensor(context_lens, dtype=torch.int32, device=dev)
        starts = torch.tensor(query_start, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=block_tables,
            context_lens=lens,
            query_start_loc=starts,
            remote=StepRemoteAttention.plan(remote, chunks, query_start, bs) if remote is not None else None,
            plan=plan_paged_attention(block_tables, lens, starts, self.kv_caches[0][0], self.dtype),
            slots_checked=True,
        )
        lora = None
        if self.adapters:
            lora = LoRABatch.build([(c.seq.lora, c.num_tokens) for c in chunks], dev)
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.kv_caches,
            meta,
            lora,
        )
        rows = sample_rows + score_rows
        if not rows:
            return hidden.new_empty(0, self.model_config.vocab_size, dtype=torch.float32)
        return self._compute_logits(hidden[rows])

    def _compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The lm_head, the step's largest read (memory-bound), may take the host's spare core.
        return run_on_threads(self.logits_threads or self.num_threads, self.num_threads, self.model.compute_logits,
                              hidden)

