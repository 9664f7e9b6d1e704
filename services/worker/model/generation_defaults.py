"""Default sampling parameters from a checkpoint's generation_config.json, as vLLM applies them
(its default ``--generation-config auto``): a request that leaves temperature, top_p, top_k, min_p
or repetition_penalty unset gets the model authors' value instead of OpenAI's default. Plain
Python, no torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

GENERATION_CONFIG_AUTO = "auto"  # the model directory's generation_config.json
GENERATION_CONFIG_NONE = "vllm"  # none: OpenAI's defaults (vLLM's name for it)

# generation_config.json key -> (SamplingParams field, the values it may take)
_FIELDS = {
    "temperature": lambda v: 0 <= v < math.inf,
    "top_p": lambda v: 0 < v <= 1,
    "top_k": lambda v: v == int(v) and v >= -1,
    "min_p": lambda v: 0 <= v <= 1,
    "repetition_penalty": lambda v: 0 < v < math.inf,
}


def check_setting(setting: str) -> None:
    """--generation-config is auto, vllm, or a directory holding a generation_config.json; else a
    ValueError saying so (the worker, and kvmesh up before it starts anything)."""
    if setting not in (GENERATION_CONFIG_AUTO, GENERATION_CONFIG_NONE) and not (
            Path(setting) / "generation_config.json").is_file():
        raise ValueError(f"--generation-config must be 'auto', 'vllm' or a directory holding a "
                         f"generation_config.json; {setting!r} has no generation_config.json")


def sampling_defaults(setting: str, model_dir: Path) -> dict:
    """``setting`` (auto | vllm | a directory holding generation_config.json) -> SamplingParams
    fields. A file without any of those keys gives {}; a missing one too, unless named explicitly."""
    check_setting(setting)
    if setting == GENERATION_CONFIG_NONE:
        return {}
    path = (Path(model_dir) if setting == GENERATION_CONFIG_AUTO else Path(setting)) / "generation_config.json"
    if not path.is_file():  # 'auto' on a checkpoint without one
        return {}
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    out = {}
    for name, valid in _FIELDS.items():
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise ValueError(f"{path}: {name}={value!r} is not a valid {name}")
        out[name] = int(value) if name == "top_k" else float(value)
    if out.get("top_k") in (0, -1):  # HF and vLLM: no top-k cut
        out["top_k"] = None
    return out
