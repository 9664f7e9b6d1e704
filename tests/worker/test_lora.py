"""LoRA adapters: greedy tokens of requests run with an adapter equal PEFT's generate on the same
base weights and adapter, with several adapters and the base model in one batch; bad adapters are
refused at start-up, naming what to change."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.worker.engine.api import GenerateRequest, InvalidRequest, NotFound, SamplingParams
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from services.worker.config import parse_lora_module
from services.worker.model.lora import LoRAAdapter, LoRABatch, LoRAError
from tests.worker.checkpoints import save_checkpoint
from tests.worker.test_engine_oracle import MAX_TOKENS, _prompts

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base_dir, out_dir, seed: int, **lora_config) -> None:
    """A PEFT adapter of random, non-zero weights (PEFT starts B at zero, which would change nothing)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with warnings.catch_warnings():  # transformers' deprecation notices from inside PEFT
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **lora_config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    peft_model.save_pretrained(str(out_dir))


def peft_greedy(base_dir, adapter_dir, prompts, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    if adapter_dir is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = save_checkpoint(root / "base", "llama")
    adapters = {"qv": root / "qv", "all": root / "all"}
    save_adapter(base, adapters["qv"], seed=1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    save_adapter(base, adapters["all"], seed=2, r=4, lora_alpha=8, use_rslora=True, target_modules=ALL_PROJECTIONS)
    prompts = _prompts(1024)
    expected = {name: peft_greedy(base, path, prompts) for name, path in [(None, None), *adapters.items()]}
    return base, adapters, prompts, expected


def _engine(base, adapters, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(base), dtype="float32", lora_modules=tuple(
        (name, str(path)) for name, path in adapters.items()), **kw))


def _run(engine: LLMEngine, jobs: list[tuple[str | None, list[int]]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    for i, (lora, ids) in enumerate(jobs):
        engine.submit(engine.prepare(GenerateRequest(f"r{i}", params, prompt_token_ids=tuple(ids), lora_name=lora)))
    outs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(jobs))}
    while engine.has_work():
        for delta in engine.step():
            outs[delta.request_id].extend(delta.token_ids)
    return [outs[f"r{i}"] for i in range(len(jobs))]


def test_adapters_change_the_answers(lora_setup):
    """The oracle's adapters are not no-ops, so the comparisons below can fail."""
    _, _, _, expected = lora_setup
    assert expected["qv"] != expected[None] and expected["all"] != expected[None]
    assert expected["qv"] != expected["all"]


@pytest.mark.parametrize("num_blocks", [4096, 14])  # 14 blocks of 16: preemption by recompute
def test_mixed_batch_matches_peft(lora_setup, num_blocks):
    base, adapters, prompts, expected = lora_setup
    engine = _engine(base, adapters, num_kv_blocks=num_blocks)
    # every prompt with each of base, qv and all, run together in one engine
    names = [None, "qv", "all"]
    jobs = [(names[(i + k) % 3], ids) for k in range(3) for i, ids in enumerate(prompts)]
    outs = _run(engine, jobs)
    for (name, ids), out in zip(jobs, outs):
        assert out == expected[name][prompts.index(ids)], (name, len(ids))
    assert engine.blocks.num_used_blocks == 0


def test_qwen2_adapter_matches_peft(tmp_path):
    """Qwen2's q/k/v biases stay the base model's; the adapter adds to the fused projection."""
    base = save_checkpoint(tmp_path / "qwen2", "qwen2")
    save_adapter(base, tmp_path / "a", seed=3, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS)
    prompts = _prompts(1024)[:4]
    engine = _engine(base, {"a": tmp_path / "a"})
    assert _run(engine, [("a", ids) for ids in prompts]) == peft_greedy(base, tmp_path / "a", prompts)


def test_prefix_cache_is_not_shared_across_adapters(lora_setup):
    base, adapters, prompts, expected = lora_setup
    engine = _engine(base, adapters)
    long_prompt = prompts[5]  # 100 tokens: 6 full blocks
    assert _run(engine, [(None, long_prompt)]) == [expected[None][5]]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    cached = []
    for name in ("qv", "qv", None):
        engine.submit(engine.prepare(GenerateRequest(f"c-{name}", params, prompt_token_ids=tuple(long_prompt),
                                                     lora_name=name)))
        tokens = []
        while engine.has_work():
            for d in engine.step():
                tokens.extend(d.token_ids)
                last = d
        assert tokens == expected[name][5], name
        cached.append(last.num_cached_tokens)
    # the first qv request finds none of the base model's blocks; the second its own, as the base one does
    assert cached == [0, 96, 96]
    assert engine.blocks.num_used_blocks == 0


def test_an_adapter_loaded_again_under_its_name_never_meets_the_old_ones_kv(lora_setup):
    """vLLM's runtime loading: unload 'x' (qv), load another adapter (all) as 'x': the same prompt
    finds none of the old adapter's cached blocks."""
    base, adapters, prompts, expected = lora_setup
    engine = _engine(base, {})
    assert engine.load_lora("x", str(adapters["qv"])) == {"x": str(adapters["qv"])}
    assert _run(engine, [("x", prompts[5])]) == [expected["qv"][5]]
    with pytest.raises(InvalidRequest, match="already loaded"):
        engine.load_lora("x", str(adapters["all"]))
    assert engine.unload_lora("x") == {}
    with pytest.raises(NotFound, match="'x' is not loaded here"):
        engine.unload_lora("x")
    engine.load_lora("x", str(adapters["all"]))
    assert _run(engine, [("x", prompts[5])]) == [expected["all"][5]]
    with pytest.raises(InvalidRequest, match="has no adapter_config.json"):
        engine.load_lora("y", str(base))
    assert engine.lora_modules == {"x": str(adapters["all"])}


def test_unknown_adapter_is_refused(lora_setup):
    base, adapters, prompts, _ = lora_setup
    engine = _engine(base, {"qv": adapters["qv"]})
    with pytest.raises(InvalidRequest, match="'nope' is not loaded here; loaded: \\['qv'\\]"):
        engine.prepare(GenerateRequest("x", SamplingParams(max_tokens=2), prompt_token_ids=(1, 2), lora_name="nope"))


def _copy_adapter(src, dst, config_change=None, tensors_change=None):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(config_change or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if tensors_change is not None:
        tensors = tensors_change(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def _rename_first(old: str, new: str):
    def change(tensors):
        return {k.replace(old, new) if old in k else k: v for k, v in tensors.items()}
    return change


@pytest.mark.parametrize("config_change,tensors_change,kw,message", [
    (None, None, {"max_lora_rank": 4}, "rank 8, over --max-lora-rank 4: start the worker with --max-lora-rank 8"),
    ({"use_dora": True}, None, {}, "use_dora=True is not supported"),
    ({"bias": "all"}, None, {}, "bias='all' is not supported"),
    ({"peft_type": "IA3"}, None, {}, "peft_type is 'IA3'; only LORA"),
    (None, _rename_first("layers.0.self_attn.q_proj", "embed_tokens"), {}, "is not a LoRA weight of this model"),
    (None, _rename_first("layers.1.", "layers.7."), {}, "is not a LoRA weight of this model's 2 layers"),
    (None, lambda t: {k: (v[:, :32].contiguous() if "q_proj.lora_A" in k else v) for k, v in t.items()}, {},
     "is it an adapter of another base model"),
    (None, lambda t: {k: v for k, v in t.items() if "q_proj.lora_B" not in k}, {}, "not both A and B"),
])
def test_bad_adapters_are_refused_at_start(lora_setup, tmp_path, config_change, tensors_change, kw, message):
    base, adapters, _, _ = lora_setup
    bad = _copy_adapter(adapters["qv"], tmp_path / "bad", config_change, tensors_change)
    with pytest.raises(LoRAError, match=message):
        _engine(base, {"bad": bad}, **kw)


def test_missing_adapter_files_are_refused(lora_setup, tmp_path):
    base, adapters, _, _ = lora_setup
    with pytest.raises(LoRAError, match="has no adapter_config.json"):
        _engine(base, {"empty": tmp_path})
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(LoRAError, match="has no adapter_model.safetensors"):
        _engine(base, {"empty": tmp_path})


def test_parse_lora_module():
    assert parse_lora_module("sql=/a/b") == ("sql", "/a/b")
    assert parse_lora_module('{"name": "sql", "path": "/a/b", "base_model_name": "x"}') == ("sql", "/a/b")
    for bad in ("sql", "=/a", "sql=", '{"name": "sql"}', "{not json"):
        with pytest.raises(ValueError, match="--lora-modules"):
            parse_lora_module(bad)


def test_batch_rows_per_adapter():
    a = LoRAAdapter("a", "/a", 1, 1.0, ())
    b = LoRAAdapter("b", "/b", 1, 1.0, ())
    batch = LoRABatch.build([(a, 3), (None, 2), (b, 1), (a, 2)], torch.device("cpu"))
    (ga, rows_a), (gb, rows_b) = batch.groups
    assert ga is a and rows_a.tolist() == [0, 1, 2, 6, 7]
    assert gb is b and rows_b == slice(5, 6)
    assert LoRABatch.build([(None, 4)], torch.device("cpu")) is None


def test_adapters_with_speculative_decoding_match_peft(lora_setup):
    """Proposed tokens run through the adapter's projections like any other row."""
    base, adapters, prompts, expected = lora_setup
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
    engine = _engine(base, adapters, speculative_config=spec)
    names = [None, "qv", "all"]
    jobs = [(names[i % 3], ids) for i, ids in enumerate(prompts)]
    outs = _run(engine, jobs)
    assert outs == [expected[name][prompts.index(ids)] for name, ids in jobs]
    assert engine.spec_stats.num_accepted > 0
