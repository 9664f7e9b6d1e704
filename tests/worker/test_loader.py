"""Loading checkpoints: sharded files, dtypes, and clear typed errors for what cannot be served."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from services.worker.model.config import load_model_config
from services.worker.model.errors import CheckpointMismatch, ModelError, ModelNotFound, UnsupportedModel
from services.worker.model.loader import load_model, resolve_dtype
from tests.worker.checkpoints import save_checkpoint
from tests.worker.test_engine_oracle import run_engine


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("base") / "m", "llama")


def _copy(base, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(base, out)
    return out


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_sharded_checkpoint_gives_the_same_tokens(base, tmp_path):
    sharded = _copy(base, tmp_path)
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    prompts = [[5, 6, 7, 8], [9, 10]]
    a, _ = run_engine(LLMEngine(EngineConfig(model=str(base))), prompts, max_tokens=6)
    b, _ = run_engine(LLMEngine(EngineConfig(model=str(sharded))), prompts, max_tokens=6)
    assert a == b


def test_dtype_auto_follows_checkpoint_and_bfloat16_runs(base):
    cfg = load_model_config(base)
    assert resolve_dtype("auto", cfg, torch.device("cpu")) == torch.float32
    engine = LLMEngine(EngineConfig(model=str(base), dtype="bfloat16"))
    assert engine.runner.kv_cache.dtype == torch.bfloat16
    out, _ = run_engine(engine, [[5, 6, 7]], max_tokens=4)
    assert len(out[0]) == 4
    with pytest.raises(ModelError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", cfg, torch.device("cpu"))
    with pytest.raises(ModelError, match="dtype 'int8' is not supported"):
        resolve_dtype("int8", cfg, torch.device("cpu"))


def test_unknown_directory(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nope")))


def test_unsupported_architecture(base, tmp_path):
    path = _copy(base, tmp_path)
    _edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        load_model_config(path)


def test_unsupported_rope(base, tmp_path):
    path = _copy(base, tmp_path)
    _edit_config(path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModel, match="rope type 'yarn'"):
        load_model_config(path)


def test_missing_tensor(base, tmp_path):
    path = _copy(base, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match="model.layers.1.mlp.up_proj.weight"):
        load_model(path, torch.float32, torch.device("cpu"))


def test_wrongly_shaped_tensor(base, tmp_path):
    path = _copy(base, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match=r"norm.weight has shape \(65,\), the config implies \(64,\)"):
        load_model(path, torch.float32, torch.device("cpu"))


def test_unexpected_tensor(base, tmp_path):
    path = _copy(base, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.extra.weight"] = torch.ones(3)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match="unexpected tensors"):
        load_model(path, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gives_transformers_bits(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from services.worker.model.llama import RMSNorm

    gen = torch.Generator().manual_seed(0)
    for tokens, hidden in ((1, 256), (7, 256), (64, 4096)):
        ours, theirs = RMSNorm(hidden, 1e-6).to(dtype), LlamaRMSNorm(hidden, 1e-6).to(dtype)
        weight = (torch.randn(hidden, generator=gen) * 0.1 + 1).to(dtype)
        ours.weight.data.copy_(weight)
        theirs.weight.data.copy_(weight)
        x = (torch.randn(tokens, hidden, generator=gen) * 3).to(dtype)
        assert torch.equal(ours(x), theirs(x))
