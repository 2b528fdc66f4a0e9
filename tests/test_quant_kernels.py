"""Weight-only quantized linear layers (kernels/quant*.py, kernels/cpu/quant.c) against
dequantize-then-matmul in torch, and the torch references against gguf's own quantizer.

The kernels dequantize to the same float32 values as the reference, so results differ only in the
order of the float32 accumulation. Any order of summing K products (and a bias) is within
gamma(K + 1) * sum |x||w| (+ |b|) of the exact sum, gamma(n) = n u / (1 - n u), u = 2^-24; two
orders are within twice that of each other. The tests assert that bound: a misread block is off by
about sum |x||w| itself, orders of magnitude more.
"""

import os
import platform
import subprocess
import sys

import pytest
import torch

from conveyor.kernels import cpu as cpu_kernels
from conveyor.kernels import quant_linear
from conveyor.kernels.quant import BLOCK, QuantizedWeight, QuantType, dequantize, quantize
from conveyor.kernels.quant_linear import quantized_linear

gguf_quants = pytest.importorskip("gguf.quants")
GGML = pytest.importorskip("gguf").GGMLQuantizationType

TYPES = list(QuantType)
ids = lambda t: t.name  # noqa: E731


def random_weight(qtype: QuantType, n: int, k: int, seed: int = 0) -> QuantizedWeight:
    """Q8_0/Q4_0/Q4_1 quantized from normal values; Q4_K (which gguf cannot quantize) as random
    bytes with small finite scales."""
    gen = torch.Generator().manual_seed(seed)
    if qtype != QuantType.Q4_K:
        return quantize(torch.randn(n, k, generator=gen), qtype)
    blocks = torch.randint(0, 256, (n, k // 256 * 144), dtype=torch.uint8, generator=gen)
    per_block = blocks.view(-1, 144)
    per_block[:, :4] = (torch.rand(per_block.shape[0], 2, generator=gen) * 0.01).half().view(torch.uint8)
    return QuantizedWeight(blocks, qtype, (n, k))


def k_for(qtype: QuantType) -> int:
    return 512 if qtype == QuantType.Q4_K else 96


def assert_within_accumulation_rounding(y, x, w, bias=None):
    k = x.shape[1]
    u = 2.0 ** -24
    gamma = (k + 1) * u / (1 - (k + 1) * u)
    magnitude = x.abs().float() @ w.abs().t()
    want = x.float() @ w.t()
    if bias is not None:
        magnitude, want = magnitude + bias.abs().float(), want + bias.float()
    tol = 2 * gamma * magnitude
    if y.dtype == torch.bfloat16:  # and the result's one rounding to bf16
        tol = tol + 2.0 ** -8 * want.abs()
    excess = (y.float() - want).abs() - tol
    assert excess.max() <= 0, f"off by {excess.max():.3g} beyond the bound"


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def kernels():
    library = cpu_kernels.load()
    assert library is not None, "the C kernels must build here (is a C compiler installed?)"
    return library


# ---- the torch references against gguf ----

@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_dequantize_gives_ggufs_values(qtype):
    weight = random_weight(qtype, 5, k_for(qtype))
    want = gguf_quants.dequantize(weight.blocks.numpy(), GGML(int(qtype)))
    assert torch.equal(dequantize(weight), torch.from_numpy(want))


@pytest.mark.parametrize("qtype", [QuantType.Q8_0, QuantType.Q4_0, QuantType.Q4_1], ids=ids)
def test_quantize_writes_ggufs_bytes(qtype):
    w = torch.randn(9, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    w[0, :32] = 0  # a zero block: scale 0
    w[1, :32] = torch.tensor([3.0, -3.0] * 16)  # equal magnitudes: Q4_0 takes the first as its extreme
    w[2, :32] = torch.tensor([-3.0, 3.0] * 16)
    w[3, :32] = 7.0  # a constant block
    w[4, :32] = torch.linspace(-1, 1, 32)  # codes at every rounding boundary
    got = quantize(w.bfloat16(), qtype)  # bf16 in, quantized from its float32 values
    want = gguf_quants.quantize(w.bfloat16().float().numpy(), GGML(int(qtype)))
    assert got.shape == (9, 128) and torch.equal(got.blocks, torch.from_numpy(want))


def test_quantize_refuses_formats_and_shapes_it_does_not_make():
    with pytest.raises(ValueError, match="Q8_0, Q4_0 or Q4_1"):
        quantize(torch.randn(4, 256), QuantType.Q4_K)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(4, 48), QuantType.Q8_0)


def test_quantized_weight_checks_its_blocks_against_its_shape():
    with pytest.raises(ValueError, match="blocks must be contiguous uint8 \\[3, 36\\]"):
        QuantizedWeight(torch.zeros(3, 34, dtype=torch.uint8), QuantType.Q4_0, (3, 64))
    with pytest.raises(ValueError, match="K must be a positive multiple of 256"):
        QuantizedWeight(torch.zeros(3, 144, dtype=torch.uint8), QuantType.Q4_K, (3, 128))


# ---- the CPU kernels ----

@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_cpu_dequantize_equals_the_torch_reference(kernels, qtype):
    weight = random_weight(qtype, 7, k_for(qtype))
    assert torch.equal(kernels.quant_dequantize(weight.blocks, qtype, weight.shape), dequantize(weight))


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("qtype", TYPES, ids=ids)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])  # tiles of 8 rows of x, and every kind of last tile
def test_cpu_gemv_matches_dequantize_then_matmul(kernels, threads, qtype, rows):
    weight = random_weight(qtype, 37, k_for(qtype))
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(37) if rows % 2 else None
    y = kernels.quant_gemv(x, weight.blocks, qtype, weight.shape, bias)
    assert y.shape == (rows, 37) and y.dtype == torch.float32
    assert_within_accumulation_rounding(y, x, dequantize(weight), bias)


@pytest.mark.parametrize("qtype", TYPES, ids=ids)
def test_cpu_gemv_takes_bf16_activations_and_bias(kernels, qtype):
    weight = random_weight(qtype, 37, k_for(qtype))
    x, bias = torch.randn(3, weight.shape[1]).bfloat16(), torch.randn(37).bfloat16()
    y = kernels.quant_gemv(x, weight.blocks, qtype, weight.shape, bias)
    assert y.dtype == torch.bfloat16
    assert_within_accumulation_rounding(y, x, dequantize(weight), bias)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("qtype", TYPES, ids=ids)
@pytest.mark.parametrize("panel_elements", [1 << 20, 2048])  # W at once, and a panel of a few rows at a time
def test_cpu_gemm_path_matches_dequantize_then_matmul(monkeypatch, threads, qtype, panel_elements):
    monkeypatch.setattr(quant_linear, "PANEL_ELEMENTS", panel_elements)
    weight = random_weight(qtype, 37, k_for(qtype))
    x = torch.randn(quant_linear.GEMV_MAX_ROWS + 3, weight.shape[1])
    bias = torch.randn(37)
    y = quantized_linear(x, weight, bias)
    assert_within_accumulation_rounding(y, x, dequantize(weight), bias)


@pytest.mark.parametrize("rows", [2, quant_linear.GEMV_MAX_ROWS + 1])
def test_quantized_linear_keeps_leading_dims_and_dtype(rows):
    weight = random_weight(QuantType.Q4_1, 33, 64)
    x = torch.randn(rows, 1, 64).bfloat16()
    y = quantized_linear(x, weight)
    assert y.shape == (rows, 1, 33) and y.dtype == torch.bfloat16
    assert_within_accumulation_rounding(y.view(rows, 33), x.view(rows, 64), dequantize(weight))


def test_cpu_kernels_refuse_blocks_that_do_not_match_the_shape(kernels):
    weight = random_weight(QuantType.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="blocks must be contiguous CPU uint8 holding 5 rows of 68 bytes"):
        kernels.quant_gemv(torch.randn(1, 64), weight.blocks, QuantType.Q8_0, (5, 64))
    with pytest.raises(ValueError, match="qtype must be one of"):
        kernels.quant_dequantize(weight.blocks, 99, (4, 64))
    with pytest.raises(ValueError, match="x must be a contiguous CPU tensor \\[M >= 1, 64\\]"):
        kernels.quant_gemv(torch.randn(1, 32), weight.blocks, QuantType.Q8_0, (4, 64))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 targets")
@pytest.mark.parametrize("arch", ["x86-64-v2", "x86-64-v3"])  # portable C (and fp16 without F16C); AVX2 + FMA
def test_cpu_kernels_built_for_other_targets_agree_too(tmp_path, arch):
    env = {**os.environ, "CONVEYOR_CPU_ARCH": arch, "CONVEYOR_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                             "cpu and not other_targets", __file__], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.listdir(tmp_path / "cpu_kernels")  # built afresh for that target


# ---- the Triton kernel, under the interpreter ----

@pytest.mark.parametrize("qtype", TYPES, ids=ids)
@pytest.mark.parametrize("rows", [1, 9])
def test_triton_quant_matmul_matches_dequantize_then_matmul(qtype, rows):
    from conveyor.kernels.quant_matmul import quant_matmul

    weight = random_weight(qtype, 37, 256 if qtype == QuantType.Q4_K else 64)
    x, bias = torch.randn(rows, weight.shape[1]), torch.randn(37)
    y = quant_matmul(x, weight, bias)
    assert y.shape == (rows, 37) and y.dtype == torch.float32
    assert_within_accumulation_rounding(y, x, dequantize(weight), bias)


def test_block_table_matches_ggufs():
    from gguf.constants import GGML_QUANT_SIZES

    assert all(BLOCK[t] == GGML_QUANT_SIZES[GGML(int(t))] for t in TYPES)


def test_bench_quant_times_each_kernel_on_a_shape(tmp_path, capsys):
    import json

    from conveyor.tools import bench_quant

    out = tmp_path / "quant.json"
    bench_quant.main(["--shapes", "k_proj/v_proj", "--repeats", "1", "--out", str(out)])
    assert "GB/s" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert [r["kernel"] for r in results] == list(bench_quant.KERNELS)
    assert results[0]["weight_mb"] == pytest.approx(192 * 576 // 32 * 20 / 1e6)  # Q4_1: 20 bytes a block of 32
    assert all(r["us"] > 0 and r["gb_per_s"] > 0 for r in results)


def test_rows_and_column_blocks_of_a_weight_dequantize_to_the_same_slices():
    weight = random_weight(QuantType.Q4_1, 6, 128)
    full = dequantize(weight)
    assert torch.equal(dequantize(weight.narrow(0, 2, 3)), full[2:5])
    assert torch.equal(dequantize(weight.narrow(1, 32, 64)), full[:, 32:96])
    fused = QuantizedWeight.cat_rows([weight.narrow(0, 0, 2), weight.narrow(0, 2, 4)])
    assert fused.shape == (6, 128) and torch.equal(fused.blocks, weight.blocks)
    with pytest.raises(ValueError, match="multiples of 32"):
        weight.narrow(1, 16, 32)
