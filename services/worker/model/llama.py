"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over packed tokens and a paged KV cache."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from services.worker.model.attention import AttentionMetadata, paged_attention
from services.worker.model.config import ModelConfig
from services.worker.model.lora import LoRABatch
from services.worker.model.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' LlamaRMSNorm: fp32 statistics, cast back, then scale. F.rms_norm computes
        # bf16 input in fp32 too and gives the same bits (tests/worker/test_loader.py), in 1 op, not 6.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v projections fused into one matmul (the loader concatenates the weights).
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, rotary, kv_cache, meta: AttentionMetadata, lora: LoRABatch | None):
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        if lora is not None:
            qkv = lora.apply(self.layer_idx, "qkv", x, qkv)
        # q and k heads rotate in one pass: [T, H + Hkv, D]
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim), rotary)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        out = paged_attention(self.layer_idx, q, k, v, k_cache, v_cache, meta, self.scale)
        out = out.reshape(num_tokens, self.q_size)
        if lora is None:
            return self.o_proj(out)
        return lora.apply(self.layer_idx, "o", out, self.o_proj(out))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        if lora is None:
            gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        gate, up = lora.apply(self.layer_idx, "gate_up", x, self.gate_up_proj(x)).split(self.intermediate, dim=-1)
        h = F.silu(gate) * up
        return lora.apply(self.layer_idx, "down", h, self.down_proj(h))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer_idx)

    def forward(self, x, rotary, kv_cache, meta, lora: LoRABatch | None = None):
        x = x + self.self_attn(self.input_layernorm(x), rotary, kv_cache, meta, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.config = cfg
        # Weights always come from a checkpoint: no random init (normal_ under a meta-device context
        # imports torch._dynamo, ~0.9 s of a worker's start).
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, dtype
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: [num_blocks, block_size, Hkv, D] x2
        meta: AttentionMetadata,
        lora: LoRABatch | None = None,  # which tokens use which LoRA adapter (None: none does)
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rotary = self.rope(positions)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, rotary, kv_cache, meta, lora)
        return self.norm(x)  # [T, hidden]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, vocab]
