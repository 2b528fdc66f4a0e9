"""rms_norm / fused_add_rms_norm against their references and Hugging Face's LlamaRMSNorm."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from conveyor.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = lambda d: str(d).removeprefix("torch.")  # noqa: E731
# fp32 rsqrt may differ from torch's in the last bit (1 ulp after rounding); the interpreter truncates bf16.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (2e-2, 1.6e-2)}


def inputs(tokens, hidden, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_is_hugging_face_llama_rms_norm_bit_for_bit(dtype):
    x, weight = inputs(5, 96, dtype)
    hf = LlamaRMSNorm(96, eps=1e-6).to(dtype)
    hf.weight.data.copy_(weight)
    with torch.no_grad():
        assert torch.equal(rms_norm_ref(x, weight, 1e-6), hf(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 100), (3, 1000)])
def test_rms_norm_matches_reference(dtype, tokens, hidden):
    x, weight = inputs(tokens, hidden, dtype)
    out = rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-5), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_add_rms_norm_updates_residual_and_x_in_place(dtype):
    x, weight = inputs(7, 100, dtype)
    residual, _ = inputs(7, 100, dtype, seed=1)
    x_ref, res_ref = fused_add_rms_norm_ref(x.clone(), residual.clone(), weight, 1e-6)
    normed, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert normed is x and new_residual is residual
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(new_residual, res_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(normed, x_ref, atol=atol, rtol=rtol)


def test_fused_add_rms_norm_reference_is_the_decoder_layer_add_then_norm():
    x, weight = inputs(4, 64, torch.bfloat16)
    residual, _ = inputs(4, 64, torch.bfloat16, seed=1)
    expected_residual = residual + x
    expected = rms_norm_ref(expected_residual, weight, 1e-6)
    normed, new_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    assert torch.equal(new_residual, expected_residual) and torch.equal(normed, expected)


def test_strided_rows_are_read_and_written_in_place():
    wide, weight = inputs(3, 128, torch.float32)
    x = wide[:, :64]
    residual = torch.randn(3, 200)[:, 100:164]
    expected = fused_add_rms_norm_ref(x.clone(), residual.clone(), weight[:64], 1e-6)
    torch.testing.assert_close(rms_norm(x, weight[:64], 1e-6), rms_norm_ref(x, weight[:64], 1e-6))
    fused_add_rms_norm(x, residual, weight[:64], 1e-6)
    torch.testing.assert_close((x, residual), expected)


@pytest.mark.parametrize("bad,message", [
    (lambda x, w: (x.t(), w), "x must be contiguous in its last dimension"),
    (lambda x, w: (x, w[:10]), r"weight must have shape \[64\]"),
    (lambda x, w: (x[None], w), "x must have 2 dims"),
    (lambda x, w: (x.long(), w), "x must have dtype"),
])
def test_bad_layout_raises_value_error_naming_the_argument(bad, message):
    x, weight = bad(*inputs(64, 64, torch.float32))
    with pytest.raises(ValueError, match=message):
        rms_norm(x, weight, 1e-6)


def test_fused_add_rms_norm_rejects_a_residual_of_another_dtype():
    x, weight = inputs(2, 64, torch.float16)
    with pytest.raises(ValueError, match="residual must have dtype torch.float16"):
        fused_add_rms_norm(x, x.float(), weight, 1e-6)
