"""Random-weight Hugging Face checkpoints saved by transformers, built offline for the oracle tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from services.worker.model.tiny import materialize_tiny

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def save_checkpoint(out_dir: Path, arch: str = "llama", tied: bool = False, rope_scaling: dict | None = None,
                    vocab_size: int = 1024, seed: int = 0) -> Path:
    import transformers

    common = dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
    )
    if rope_scaling is not None:
        common["rope_scaling"] = rope_scaling
        common["rope_theta"] = 500000.0
    if arch == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif arch == "mistral":
        config, cls = transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # larger-than-default weights: less flat logits, more varied greedy text
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))  # non-trivial norms: their loading is tested too
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tiny = materialize_tiny()
    for name in TOKENIZER_FILES:
        if (tiny / name).is_file():
            shutil.copy(tiny / name, out_dir / name)
    return out_dir
