"""CPU linears with prepacked weights give F.linear's results (bf16: bit for bit)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from services.worker.model.packed_linear import PackedLinear, pack_linears, prepacking_supported


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_packed_linear_matches_f_linear(dtype, bias):
    if not prepacking_supported(dtype):
        pytest.skip(f"oneDNN cannot prepack {dtype} on this CPU")
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    for rows in (1, 3, 16, 17, 300):  # the packing hint is 16 rows; any count must work
        x = torch.randn(rows, 96).to(dtype)
        want = F.linear(x, linear.weight, linear.bias)
        got = packed(x)
        assert got.shape == want.shape and got.dtype == dtype
        if dtype == torch.bfloat16:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pack_linears_swaps_every_linear_of_a_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4, bias=False)))
    x = torch.randn(5, 8)
    want = model(x)
    swapped = pack_linears(model)
    assert swapped == (2 if prepacking_supported(torch.float32) else 0)
    assert not any(type(m) is nn.Linear for m in model.modules()) or swapped == 0
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
