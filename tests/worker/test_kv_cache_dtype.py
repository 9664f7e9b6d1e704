"""vLLM's --kv-cache-dtype fp8: the cache holds 8-bit floats (scale 1), attention computes in the
model's dtype. Greedy tokens equal transformers' generate with a cache that rounds every key and
value to the same 8 bits; the same memory holds 4x (fp32) the tokens."""

from __future__ import annotations

import pytest
import torch

from kernels import paged_attention_partial, store_kv
from kernels.reference import paged_attention_partial_ref
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from services.worker.engine.model_runner import kv_bytes_per_block
from tests.worker.checkpoints import save_checkpoint
from tests.worker.test_engine_oracle import MAX_TOKENS, _prompts, run_engine

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def hf_greedy_fp8(model_dir, prompts, fp8: torch.dtype) -> list[list[int]]:
    import transformers

    class RoundingCache(transformers.DynamicCache):
        """Every key and value rounded to fp8 as it enters: what an fp8 KV cache attends over."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            def rounded(t):
                return t.to(fp8).to(t.dtype)

            return super().update(rounded(key_states), rounded(value_states), layer_idx, *args, **kwargs)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), cache=RoundingCache(), max_new_tokens=MAX_TOKENS,
                                 min_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("fp8") / "llama", "llama")


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("num_blocks", [4096, 14])  # 14 x 16: preemption
def test_greedy_tokens_equal_transformers_with_an_fp8_rounding_cache(checkpoint, kv_cache_dtype, num_blocks):
    prompts = _prompts(1024)
    expected = hf_greedy_fp8(checkpoint, prompts, FP8[kv_cache_dtype])
    engine = LLMEngine(EngineConfig(model=str(checkpoint), dtype="float32", num_kv_blocks=num_blocks,
                                    kv_cache_dtype=kv_cache_dtype))
    assert engine.runner.kv_cache.dtype == FP8[kv_cache_dtype]
    outs, _ = run_engine(engine, prompts)
    assert outs == expected
    assert engine.blocks.num_used_blocks == 0


def test_the_rounding_changes_the_answers(checkpoint):
    """So the test above can fail: fp8 K/V give other tokens than full-precision ones somewhere."""
    from tests.worker.test_engine_oracle import hf_greedy

    prompts = _prompts(1024)
    assert hf_greedy_fp8(checkpoint, prompts, torch.float8_e5m2) != hf_greedy(checkpoint, prompts)


def test_the_same_memory_holds_four_times_the_tokens_of_fp32(checkpoint):
    budget = 1 << 20
    plain = LLMEngine(EngineConfig(model=str(checkpoint), dtype="float32", kv_cache_bytes=budget))
    fp8 = LLMEngine(EngineConfig(model=str(checkpoint), dtype="float32", kv_cache_bytes=budget, kv_cache_dtype="fp8"))
    assert fp8.runner.num_blocks == 4 * plain.runner.num_blocks
    assert fp8.kv_geometry["dtype"] == "float8_e4m3fn" and fp8.kv_geometry["compute_dtype"] == "float32"
    cfg = fp8.model_config
    assert kv_bytes_per_block(cfg, 16, torch.float8_e4m3fn) * 4 == kv_bytes_per_block(cfg, 16, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_an_fp8_cache_is_attention_over_its_values(dtype):
    """The CPU kernel over an fp8 pool equals the torch reference over the same values upcast."""
    torch.manual_seed(0)
    num_blocks, bs, hkv, d, h = 40, 16, 2, 32, 8
    k_cache = torch.zeros(num_blocks, bs, hkv, d, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    lens = [37, 1, 64, 129]
    tables = torch.tensor([[3, 7, 9, 11, 13, 15, 17, 19, 21], [5, 0, 0, 0, 0, 0, 0, 0, 0],
                           [20, 21, 22, 23, 0, 0, 0, 0, 0], [30, 31, 32, 33, 34, 35, 36, 37, 38]], dtype=torch.int32)
    slots = torch.tensor([int(tables[s, p // bs]) * bs + p % bs for s, n in enumerate(lens) for p in range(n)])
    k = torch.randn(len(slots), hkv, d, dtype=dtype)
    v = torch.randn(len(slots), hkv, d, dtype=dtype)
    store_kv(k, v, k_cache, v_cache, slots)
    q = torch.randn(len(lens), h, d, dtype=dtype)  # one decode query per sequence
    args = (tables, torch.tensor(lens, dtype=torch.int32), torch.arange(len(lens) + 1, dtype=torch.int32), d ** -0.5)
    out, lse = paged_attention_partial(q, k_cache, v_cache, *args, causal=False)
    ref_out, ref_lse = paged_attention_partial_ref(q, k_cache.to(dtype), v_cache.to(dtype), *args, causal=False)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=tol)


def test_fp8_is_served_on_cuda_too_and_unknown_names_are_refused():
    assert EngineConfig(kv_cache_dtype="fp8", device="cuda").kv_cache_dtype == "fp8"  # Triton reads it
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype="int8")


def test_a_memory_server_pool_holds_fp8_blocks():
    from services.memserver.pool import BlockPool, Geometry

    geometry = Geometry.from_dict({"num_layers": 2, "num_kv_heads": 2, "head_dim": 32, "block_size": 16,
                                   "dtype": "float8_e4m3fn", "compute_dtype": "bfloat16"})
    assert geometry.q_dtype == "bfloat16" and geometry.block_bytes == 2 * 2 * 16 * 2 * 32
    assert BlockPool(geometry, 4).kv.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        Geometry.from_dict({"num_layers": 2, "num_kv_heads": 2, "head_dim": 32, "block_size": 16,
                            "dtype": "float8_e4m3fn", "compute_dtype": "float8_e4m3fn"})


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_table_upcast_is_torchs_conversion_for_every_byte(fp8, dtype):
    from kernels.cpu_attention import upcast

    every = torch.arange(256, dtype=torch.uint8).view(fp8).reshape(4, 8, 8)
    torch.testing.assert_close(upcast(every, dtype), every.to(dtype), rtol=0, atol=0, equal_nan=True)
    assert upcast(every, dtype).shape == (4, 8, 8)


def test_the_kernels_launch_checks_refuse_fp8_e4m3_on_gpus_that_cannot_convert_it(monkeypatch):
    """Triton converts e4m3 in hardware from compute capability 8.9; older GPUs get e5m2. Shown with
    a stand-in for a CUDA tensor (only its dtype and device are read): no GPU needed."""
    from types import SimpleNamespace

    from kernels.validate import _fp8_cache

    cuda = torch.device("cuda", 0)
    for capability, e4m3_ok in (((8, 0), False), ((8, 9), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert _fp8_cache(SimpleNamespace(dtype=torch.float8_e5m2, device=cuda))
        e4m3 = SimpleNamespace(dtype=torch.float8_e4m3fn, device=cuda)
        if e4m3_ok:
            assert _fp8_cache(e4m3)
        else:
            with pytest.raises(ValueError, match="compute capability >= 8.9.*use --kv-cache-dtype fp8_e5m2"):
                _fp8_cache(e4m3)
    assert not _fp8_cache(SimpleNamespace(dtype=torch.bfloat16, device=cuda))


def test_the_kernels_launch_checks_take_an_fp8_cache_beside_a_float_q():
    """The metadata checks the Triton launchers run first (on the meta device: no data, no GPU)."""
    from kernels.validate import check_attention_inputs, check_store_inputs

    cache = torch.empty(4, 16, 2, 32, dtype=torch.float8_e4m3fn, device="meta")
    q, kv = torch.empty(1, 8, 32, device="meta"), torch.empty(1, 2, 32, device="meta")
    index = torch.zeros(1, 1, dtype=torch.int32, device="meta")
    starts = torch.zeros(2, dtype=torch.int32, device="meta")
    check_attention_inputs(q, cache, cache, index, index[0], starts, 1.0)
    check_store_inputs(kv, kv, cache, cache, torch.zeros(1, dtype=torch.int64, device="meta"))
    other = torch.empty(4, 16, 2, 32, dtype=torch.float8_e5m2, device="meta")
    with pytest.raises(ValueError, match="must share q's dtype \\(or one fp8 dtype\\)"):
        check_attention_inputs(q, cache, other, index, index[0], starts, 1.0)
