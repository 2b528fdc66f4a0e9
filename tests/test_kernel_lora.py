"""LoRA's shrink and expand kernels against TorchOps' (Triton interpreter): over every row or a
gathered set, ranks below and past one tile, widths past one tile, a column slice of s."""

import pytest
import torch

from conveyor.gpu_worker.ops import TorchOps
from conveyor.kernels.lora import lora_expand, lora_shrink

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def tensors(dtype, tokens=20, k=100, rank=24, n=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, a = torch.randn(tokens, k, generator=g).to(dtype), torch.randn(rank, k, generator=g).to(dtype)
    b, y = torch.randn(n, rank, generator=g).to(dtype), torch.randn(tokens, n + 40, generator=g).to(dtype)
    return x, a, b, y


@pytest.mark.parametrize("dtype", TOL, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("rows", [None, [3, 0, 17, 9]], ids=["all-rows", "gathered"])
@pytest.mark.parametrize("rank", [4, 24, 80])
def test_shrink_then_expand_match_torch(dtype, rows, rank):
    x, a, b, y = tensors(dtype, rank=rank)
    rows = None if rows is None else torch.tensor(rows)
    atol, rtol = TOL[dtype]
    s = lora_shrink(x, rows, a)
    torch.testing.assert_close(s, TorchOps.lora_shrink(x, rows, a), atol=atol * 10, rtol=rtol)
    expected = y.clone()
    TorchOps.lora_expand(s, rows, b, expected, 40)
    lora_expand(s, rows, b, y, 40)
    torch.testing.assert_close(y, expected, atol=atol * 10, rtol=rtol)


def test_expand_takes_a_column_slice_of_s_and_leaves_other_rows_and_columns():
    x, a, b, y = tensors(torch.float32, rank=8)
    s = torch.randn(2, 16)  # a row per row updated; B's rank is its last 8 columns
    rows = torch.tensor([1, 2])
    expected = y.clone()
    expected[1:3, :72] += s[:, 8:] @ b.T
    lora_expand(s[:, 8:], rows, b, y, 0)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda x, a, b, y: lora_shrink(x, None, a.T), "a must have shape"),
    (lambda x, a, b, y: lora_shrink(x, torch.tensor([1], dtype=torch.int32), a), "rows must have dtype"),
    (lambda x, a, b, y: lora_expand(torch.zeros(20, 24), None, b, y, 60), "must lie within y"),
    (lambda x, a, b, y: lora_expand(torch.zeros(3, 24), None, b, y, 0), "a row per row of y"),
])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(*tensors(torch.float32))
