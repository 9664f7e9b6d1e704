"""The embedded default model `tiny`: a small Llama with seeded weights and a real byte-level BPE
tokenizer, materialised offline (no hub, no network) into a cache directory on first use, in the
same Hugging Face layout the loader reads."""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

TINY_NAME = "tiny"
TINY_VERSION = "v2"  # v2: the chat template renders tools and tool calls
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 0,
    "eos_token_id": 0,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML; tools (OpenAI definitions) in a system turn of their own, an assistant's tool calls as
# <tool_call> JSON after its content (Qwen2.5's layout). Without tools the text is plain ChatML.
CHAT_TEMPLATE = (
    # (transformers renders with trim_blocks: a newline right after a block tag is dropped, hence {{ '\\n' }})
    "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n' }}</tools><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% for call in (message.tool_calls or []) %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter mother "
    "answer found study still learn should world high every near add food between own below country plant "
    "last school father keep tree never start city earth eye light thought head under story saw left few "
    "while along might close something seem next hard open example begin life always those both paper together "
    "memory server cluster block cache token attention model layer query key value stream request worker"
).split()
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def default_cache_dir() -> Path:
    root = os.environ.get("KVMESH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvmesh"
    )
    return Path(root) / "models"


def _corpus(num_lines: int = 60000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        words = []
        for _ in range(rng.randint(6, 18)):
            if rng.random() < 0.6:
                words.append(rng.choice(_WORDS))
            else:
                words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 10**rng.randint(1, 6))))
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice([".", "?", "!", ",", ":", ";"]))
    lines.append("Unicode: café, naïve, 日本語, emoji 🙂, Ωmega.")
    return lines


def _build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_CONFIG["vocab_size"],
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))


def _build_weights(out_dir: Path, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    cfg = TINY_CONFIG
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]

    def normal(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(q_out, hidden)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden, q_out)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = normal(vocab, hidden)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def materialize_tiny(cache_dir: Path | None = None) -> Path:
    """Return the tiny model's directory, building it first if needed (safe under concurrency)."""
    final = (cache_dir or default_cache_dir()) / f"{TINY_NAME}-{TINY_VERSION}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=final.parent))
    try:
        _build_tokenizer(tmp)
        _build_weights(tmp)
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}, indent=2))
        # config.json last: its presence marks a complete directory.
        (tmp / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_dir(model: str) -> Path:
    """`tiny` -> the embedded model's directory; anything else is a local HF directory."""
    return materialize_tiny() if model == TINY_NAME else Path(model)
