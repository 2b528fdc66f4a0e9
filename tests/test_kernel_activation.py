"""silu_and_mul against silu_and_mul_ref (Triton interpreter)."""

import pytest
import torch

from conveyor.kernels.activation import silu_and_mul, silu_and_mul_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# silu's fp32 exp may differ from torch's in the last bit (1 ulp after rounding); the interpreter truncates bf16.
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (2e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("tokens,inter", [(1, 64), (5, 300), (2, 1500)])  # 1500: two column blocks, ragged
def test_silu_and_mul_matches_reference(dtype, tokens, inter):
    x = (torch.randn(tokens, 2 * inter, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    out = silu_and_mul(x)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, silu_and_mul_ref(x), atol=atol, rtol=rtol)


def test_reference_is_the_models_act_fn_gate_times_up():
    gate, up = torch.randn(3, 8).bfloat16(), torch.randn(3, 8).bfloat16()
    assert torch.equal(silu_and_mul_ref(torch.cat([gate, up], dim=-1)), torch.nn.SiLU()(gate) * up)


def test_strided_rows_are_accepted():
    x = torch.randn(4, 300)[:, :256]
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.parametrize("x,message", [
    (torch.randn(3, 7), "x width must be even"),
    (torch.randn(8, 3).t(), "x must be contiguous in its last dimension"),
    (torch.randn(2, 3, 8), "x must have 2 dims"),
])
def test_bad_layout_raises_value_error(x, message):
    with pytest.raises(ValueError, match=message):
        silu_and_mul(x)
