"""Loads a Hugging Face checkpoint (config.json + *.safetensors, sharded or not) into the model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from services.worker.model.config import ModelConfig, load_model_config
from services.worker.model.errors import CheckpointMismatch, ModelError, ModelNotFound
from services.worker.model.llama import LlamaForCausalLM
from services.worker.model.packed_linear import pack_linears

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# fused parameter -> the checkpoint tensors concatenated (dim 0) into it
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto` follows the checkpoint's dtype; float16 is refused on CPU (use bfloat16)."""
    name = cfg.torch_dtype if name == "auto" else name
    if name not in DTYPES:
        raise ModelError(f"dtype {name!r} is not supported; choose one of: auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16 if name == cfg.torch_dtype else None
        if dtype is None:
            raise ModelError("float16 is not supported on CPU; use --dtype bfloat16 or float32")
    return dtype


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFound(f"no *.safetensors files in {str(model_dir)!r}")
    return files


def _hf_name(name: str) -> str:
    return name if name == "lm_head.weight" else f"model.{name}"


def _read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in _checkpoint_files(model_dir):
        if not path.is_file():
            raise CheckpointMismatch(f"checkpoint shard {path.name} listed in the index is missing")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _expected(name: str, model_param: torch.Tensor) -> list[tuple[str, int]]:
    """Checkpoint names (and dim-0 sizes, for fused params) that feed one model parameter."""
    for fused, parts in _FUSED.items():
        if f".{fused}." in name:
            return [(_hf_name(name.replace(fused, p)), -1) for p in parts]
    return [(_hf_name(name), model_param.shape[0])]


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    cfg = load_model_config(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, dtype=torch.float32)
    checkpoint = _read_checkpoint(Path(model_dir))
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        parts = []
        for hf_name, _ in _expected(name, param):
            if hf_name not in checkpoint:
                raise CheckpointMismatch(f"checkpoint has no tensor {hf_name!r} (needed for {name})")
            parts.append(checkpoint[hf_name])
            used.add(hf_name)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointMismatch(
                f"tensor for {name} has shape {tuple(tensor.shape)}, the config implies {tuple(param.shape)}"
            )
        state[name] = tensor.to(dtype)
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")
    unexpected = sorted(k for k in checkpoint if k not in used and not _IGNORED.match(k))
    if unexpected:
        raise CheckpointMismatch(f"checkpoint has unexpected tensors, e.g. {unexpected[:3]}")
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope = type(model.rope)(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, dtype)
    model = model.to(device).eval()
    if device.type == "cpu":
        pack_linears(model)
    return model
