"""Engine configuration: one frozen dataclass, validated at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from services.worker.engine.spec_decode import SpeculativeConfig
from services.worker.model.generation_defaults import check_setting

# Tokens per step (chunked-prefill budget). A step's prefill chunks stall every running stream for
# that step. Tiny model, 2 cores, 16 streams of 128 + 128 tokens, 512 -> 256 (alternated runs):
# ITL p99 31.6 -> 20.1 ms (bf16) and 46 -> 29 ms (fp32), TTFT p50 66-69 -> 48-50 ms (bf16) and
# 105 -> 73 ms (fp32), tokens/s level or better; an 8K prompt's TTFT unchanged (3.4-3.6 s).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 256
SCHEDULING_POLICIES = ("fcfs", "priority")
# vLLM's --kv-cache-dtype: auto (the model's dtype), or 8-bit floats with scale 1 (fp8 = fp8_e4m3; on
# CUDA e4m3 needs compute capability >= 8.9, which kernels.validate checks)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


def check_thread_counts(num_threads: int | None, logits_threads: int | None) -> None:
    """Each set count is at least 1 (None: the default)."""
    for name, value in (("num_threads", num_threads), ("logits_threads", logits_threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str = "tiny"  # "tiny" (embedded) or a local Hugging Face directory
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (CUDA)
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: what the KV memory budget allows
    kv_cache_bytes: int | None = None  # None: a device default (see model_runner)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # chunked-prefill token budget per step
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    logits_threads: int | None = None  # torch threads for the lm_head (CPU); None: as the rest
    enable_prefix_caching: bool = True  # reuse the KV of full blocks of earlier prompts (block_manager)
    max_model_len: int | None = None  # cap on prompt + output tokens; None: the model's max_position_embeddings
    # vLLM's --generation-config: where unset sampling fields take their defaults from (model.generation_defaults)
    generation_config: str = "auto"
    chat_template: str | None = None  # a Jinja template instead of the checkpoint's (vLLM's --chat-template)
    scheduling_policy: str = "fcfs"  # vLLM's: fcfs (arrival order) | priority (requests' priority, then arrival)
    # vLLM's --lora-modules: (name, PEFT adapter directory) pairs a request selects by name
    lora_modules: tuple[tuple[str, str], ...] = ()
    max_lora_rank: int = 16  # vLLM's --max-lora-rank: adapters of a higher rank are refused
    # vLLM's --speculative-config (JSON; method "ngram"): greedy requests check proposed tokens (spec_decode)
    speculative_config: str | None = None
    kv_cache_dtype: str = "auto"  # vLLM's --kv-cache-dtype (KV_CACHE_DTYPES)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        check_thread_counts(self.num_threads, self.logits_threads)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        check_setting(self.generation_config)
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.speculative_config is not None:
            SpeculativeConfig.parse(self.speculative_config)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        names = [name for name, _ in self.lora_modules]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"lora_modules need distinct non-empty names, got {names}")


def resolve_max_model_len(requested: int | None, model_max: int) -> int:
    """The context length served: ``requested`` (vLLM's --max-model-len) or the model's own. Past the
    positions the model was built for (its RoPE never saw them) is refused, as vLLM does."""
    if requested is None:
        return model_max
    if requested > model_max:
        raise ValueError(f"max_model_len={requested} exceeds this model's max_position_embeddings={model_max}: "
                         f"pass at most {model_max}")
    return requested
