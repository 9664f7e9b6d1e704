"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), applied per
token, so one forward pass mixes requests of several adapters and of the base model (vLLM's
multi-LoRA serving).

An adapted projection computes ``y = base(x) + (x @ A.T) @ B.T * scaling`` (PEFT's
``lora_B(lora_A(x)) * scaling``) in fp32, added to the base output before one cast back to the
model's dtype: what PEFT does for a bf16 model, whose adapter weights it keeps in fp32.

Our q/k/v and gate/up projections are fused (loader._FUSED); an adapter's slices are fused the same
way: the A matrices' rows stacked, B block-diagonal, so one pair of matmuls serves the projection.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from services.worker.model.config import ModelConfig
from services.worker.model.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# our (fused) projection -> the checkpoint projections it stacks, in order of output rows
PROJECTIONS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
               "down": ("down_proj",)}
_OWNER = {part: fused for fused, parts in PROJECTIONS.items() for part in parts}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
# adapter_config.json settings whose non-default values change the math: (key, what is supported)
_REFUSED = (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False),
            ("modules_to_save", None), ("rank_pattern", {}), ("alpha_pattern", {}))


class LoRAError(ModelError):
    """An adapter that cannot be served; the message names the adapter and what to change."""


@dataclass(frozen=True, slots=True)
class ProjectionLoRA:
    a: torch.Tensor  # [rank (stacked over slices), in_features], fp32
    b: torch.Tensor  # [out_features (all slices), rank (stacked)], fp32, block-diagonal over slices


@dataclass(frozen=True, slots=True)
class LoRAAdapter:
    name: str
    path: str
    rank: int
    scaling: float
    layers: tuple[dict[str, ProjectionLoRA], ...]  # per layer: fused projection name -> its adapter
    # What its KV is cached under (prefix_hash.hash_root): unique per load, so an adapter loaded
    # again under the same name never meets the KV of the one before.
    cache_key: str = ""


def _out_features(cfg: ModelConfig) -> dict[str, int]:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": cfg.hidden_size, "gate_proj": cfg.intermediate_size,
            "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size}


def _in_features(cfg: ModelConfig, proj: str) -> int:
    return {"o_proj": cfg.num_heads * cfg.head_dim, "down_proj": cfg.intermediate_size}.get(proj, cfg.hidden_size)


def _read_config(name: str, root: Path) -> dict:
    config_path = root / ADAPTER_CONFIG
    if not config_path.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: {str(root)!r} has no {ADAPTER_CONFIG} (a PEFT adapter directory)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise LoRAError(f"LoRA adapter {name!r}: {ADAPTER_CONFIG} is not JSON: {e}") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"LoRA adapter {name!r}: peft_type is {config['peft_type']!r}; only LORA is supported")
    for key, supported in _REFUSED:
        value = config.get(key, supported)
        if value != supported and not (supported is None and not value):
            raise LoRAError(f"LoRA adapter {name!r}: {key}={value!r} is not supported (only {supported!r})")
    if not (root / ADAPTER_WEIGHTS).is_file():
        raise LoRAError(f"LoRA adapter {name!r}: {str(root)!r} has no {ADAPTER_WEIGHTS} "
                        "(save it with PEFT's save_pretrained(safe_serialization=True))")
    return config


def _read_pairs(name: str, root: Path, cfg: ModelConfig) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(layer, checkpoint projection) -> {"A": [r, in], "B": [out, r]}, shapes checked."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(str(root / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            m = _KEY.fullmatch(key)
            if m is None or m.group(2) not in _OWNER or int(m.group(1)) >= cfg.num_layers:
                raise LoRAError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA weight of this model's "
                                f"{cfg.num_layers} layers' {', '.join(_OWNER)}")
            pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = f.get_tensor(key)
    if not pairs:
        raise LoRAError(f"LoRA adapter {name!r}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    out_features = _out_features(cfg)
    for (layer, proj), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"LoRA adapter {name!r}: layer {layer} {proj} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        want_a, want_b = (a.shape[0], _in_features(cfg, proj)), (out_features[proj], a.shape[0])
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise LoRAError(f"LoRA adapter {name!r}: layer {layer} {proj} has A {tuple(a.shape)} and B "
                            f"{tuple(b.shape)}; this model needs A [r, {want_a[1]}] and B [{want_b[0]}, r]: "
                            "is it an adapter of another base model?")
    return pairs


def load_adapter(name: str, path: str, cfg: ModelConfig, max_rank: int, device: torch.device,
                 cache_key: str = "") -> LoRAAdapter:
    root = Path(path)
    config = _read_config(name, root)
    pairs = _read_pairs(name, root, cfg)
    rank = max(ab["A"].shape[0] for ab in pairs.values())
    if rank > max_rank:
        raise LoRAError(f"LoRA adapter {name!r} has rank {rank}, over --max-lora-rank {max_rank}: "
                        f"start the worker with --max-lora-rank {rank} or more")
    r = config.get("r", rank)
    alpha = config.get("lora_alpha", r)
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    out_features = _out_features(cfg)
    layers = []
    for layer in range(cfg.num_layers):
        fused = {}
        for proj_name, parts in PROJECTIONS.items():
            present = [p for p in parts if (layer, p) in pairs]
            if not present:
                continue
            ranks = [pairs[layer, p]["A"].shape[0] for p in present]
            a = torch.cat([pairs[layer, p]["A"].float() for p in present])
            b = torch.zeros(sum(out_features[p] for p in parts), sum(ranks))
            row = col = 0
            for p in parts:  # B block-diagonal: slice p's rows read only its own rank columns
                if p in present:
                    k = pairs[layer, p]["A"].shape[0]
                    b[row: row + out_features[p], col: col + k] = pairs[layer, p]["B"].float()
                    col += k
                row += out_features[p]
            fused[proj_name] = ProjectionLoRA(a.to(device), b.to(device))
        layers.append(fused)
    return LoRAAdapter(name, str(root), rank, scaling, tuple(layers), cache_key or name)


class LoRABatch:
    """The adapters of one forward pass: which of its token rows each adapter applies to."""

    def __init__(self, groups: list[tuple[LoRAAdapter, slice | torch.Tensor]]):
        self.groups = groups  # (adapter, its rows: a slice when contiguous, else an int64 index)

    @classmethod
    def build(cls, runs: list[tuple[LoRAAdapter | None, int]], device: torch.device) -> LoRABatch | None:
        """runs: (adapter or None for the base model, number of tokens) in token order.
        None when no token uses an adapter."""
        rows: dict[str, tuple[LoRAAdapter, list[int]]] = {}
        start = 0
        for adapter, num_tokens in runs:
            if adapter is not None:
                rows.setdefault(adapter.name, (adapter, []))[1].extend(range(start, start + num_tokens))
            start += num_tokens
        groups: list[tuple[LoRAAdapter, slice | torch.Tensor]] = []
        for adapter, ids in rows.values():
            contiguous = ids[-1] - ids[0] + 1 == len(ids)
            groups.append((adapter, slice(ids[0], ids[-1] + 1) if contiguous
                           else torch.tensor(ids, dtype=torch.int64, device=device)))
        return cls(groups) if groups else None

    def apply(self, layer: int, projection: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base projection of x, [T, out]) plus each adapter's delta on its rows; may update y
        in place."""
        for adapter, rows in self.groups:
            lora = adapter.layers[layer].get(projection)
            if lora is None:
                continue
            whole = isinstance(rows, slice) and rows.start == 0 and rows.stop == y.shape[0]
            if isinstance(rows, slice):
                xs, ys = x[rows], y[rows]
            else:
                xs, ys = x.index_select(0, rows), y.index_select(0, rows)
            # ys + scaling * (xs @ A.T) @ B.T, in fp32, one rounding to y's dtype (PEFT's order of operations)
            out = torch.addmm(ys.float(), xs.float() @ lora.a.T, lora.b.T, alpha=adapter.scaling)
            if whole:
                y = out.to(y.dtype)
            elif isinstance(rows, slice):
                y[rows] = out
            else:
                y.index_copy_(0, rows, out.to(y.dtype))
        return y
