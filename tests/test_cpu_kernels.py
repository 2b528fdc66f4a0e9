"""The C element-wise kernels of kernels/cpu against the torch ops they replace, for every ISA path
this machine can execute, and op selection."""

import platform

import pytest
import torch

from conveyor.gpu_worker.models.rotary import build_cos_sin_cache
from conveyor.gpu_worker.ops import CpuOps, TorchOps, select_ops
from conveyor.kernels import cpu as cpu_kernels
from conveyor.kernels.cpu import features


def runnable(arch: str) -> bool:
    if arch == "native":
        return True
    if platform.machine() != "x86_64":
        return False
    return arch == "x86-64" or {"avx2", "fma"} <= features.host().flags


# The host's own ISA (AVX-512 here where it has it), AVX2+FMA (x86-64-v3) and the portable C
# (x86-64 has only SSE2, where no vector path is built).
ARCHS = [pytest.param(arch, marks=pytest.mark.skipif(not runnable(arch), reason=f"this CPU cannot run {arch}"))
         for arch in ("native", "x86-64-v3", "x86-64")]
EXPECTED_LANES = {"x86-64-v3": 8, "x86-64": 0}

DTYPES = [torch.float32, torch.bfloat16]
ids = lambda d: str(d).removeprefix("torch.")  # noqa: E731
# bf16: the C kernels sum in another order, which can move a rounding by one bf16 step.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}


def load_kernels(arch: str):
    kernels = cpu_kernels.load(arch)
    assert kernels is not None, "the C kernels must build here (is a C compiler installed?)"
    return kernels


@pytest.fixture(scope="module", params=ARCHS)
def ops(request) -> CpuOps:
    return CpuOps(load_kernels(request.param))


@pytest.mark.parametrize("arch", ARCHS)
def test_each_target_isa_builds_its_own_vector_path(arch):
    kernels = load_kernels(arch)
    native_lanes = 16 if "avx512f" in features.host().flags else 8 if {"avx2", "fma"} <= features.host().flags else 0
    assert kernels.vector_lanes == EXPECTED_LANES.get(arch, native_lanes)
    assert kernels.arch == arch and f"conveyor_cpu_{arch}_" in kernels.path  # one cached file per ISA


def randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("rows", [1, 3, 67])  # one row runs on the caller's thread; 67 on the pool
@pytest.mark.parametrize("dim", [576, 100])  # 100: a tail past the last 16-wide vector
def test_rms_norm_matches_torch(ops, dtype, rows, dim):
    x, weight = randn(rows, dim, dtype=dtype), randn(dim, dtype=dtype, seed=1)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), TorchOps.rms_norm(x, weight, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_rms_norm_of_strided_heads_matches_torch(ops, dtype):
    # Qwen3's per-head q norm: q is a [T, H, D] view into the fused qkv output
    qkv = randn(5, 4 * 64 + 2 * 2 * 64, dtype=dtype)
    q = qkv[:, : 4 * 64].view(5, 4, 64)
    weight = randn(64, dtype=dtype, seed=1)
    got = ops.rms_norm(q, weight, 1e-6)
    assert got.shape == q.shape
    torch.testing.assert_close(got, TorchOps.rms_norm(q, weight, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("dim", [96, 100])
def test_fused_add_rms_norm_updates_both_in_place(ops, dtype, dim):
    x, residual, weight = randn(33, dim, dtype=dtype), randn(33, dim, dtype=dtype, seed=1), randn(dim, dtype=dtype, seed=2)
    expected_x, expected_residual = TorchOps.fused_add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
    got_x, got_residual = ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert got_x is x and got_residual is residual
    torch.testing.assert_close(residual, expected_residual, atol=0, rtol=0)  # one rounding: exact
    torch.testing.assert_close(x, expected_x, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("dim", [1536, 100])  # 100: a tail past the last 16-wide vector
def test_silu_and_mul_matches_torch(ops, dtype, dim):
    x = randn(17, 2 * dim, dtype=dtype) * 4
    torch.testing.assert_close(ops.silu_and_mul(x), TorchOps.silu_and_mul(x), **TOL[dtype])


class RopeConfig:
    max_position_embeddings = 512
    rope_theta = 10000.0
    rope_scaling = None

    def __init__(self, partial: float):
        self.partial_rotary_factor = partial
        self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotary_rotates_strided_q_and_k_in_place_like_torch(ops, dtype, partial):
    cache = build_cos_sin_cache(RopeConfig(partial), head_dim=64)
    qkv = randn(9, (6 + 2 + 2) * 64, dtype=dtype)
    q, k = qkv[:, : 6 * 64].view(9, 6, 64), qkv[:, 6 * 64 : 8 * 64].view(9, 2, 64)
    positions = torch.tensor([0, 1, 2, 100, 101, 7, 300, 301, 511])
    expected = TorchOps.rotary_embedding(TorchOps.prepare_rotary(positions, cache, torch.float32),
                                         q.float(), k.float())
    untouched = qkv[:, 8 * 64 :].clone()
    got_q, got_k = ops.rotary_embedding(ops.prepare_rotary(positions, cache, dtype), q, k)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    torch.testing.assert_close(got_q.float(), expected[0], **TOL[dtype])
    torch.testing.assert_close(got_k.float(), expected[1], **TOL[dtype])
    assert torch.equal(qkv[:, 8 * 64 :], untouched)  # v is not touched


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("rows", [1, 37])
def test_store_kv_writes_strided_rows_to_their_slots_like_index_copy(ops, dtype, rows):
    qkv = randn(rows, (4 + 2 + 2) * 16, dtype=dtype)  # k and v are strided views, as the model's are
    k, v = qkv[:, 64:96].view(rows, 2, 16), qkv[:, 96:].view(rows, 2, 16)
    slots = torch.randperm(8 * 8, generator=torch.Generator().manual_seed(3))[:rows]
    slots[0] = -1  # padding: written nowhere
    k_cache, v_cache = randn(8, 8, 2, 16, dtype=dtype, seed=4), randn(8, 8, 2, 16, dtype=dtype, seed=5)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    ops.store_kv(k, v, k_cache, v_cache, slots)
    real = slots >= 0
    TorchOps.store_kv(k[real], v[real], k_expected, v_expected, slots[real])
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def test_argmax_takes_the_first_of_equal_maxima_like_torch(ops):
    x = randn(5, 1000, dtype=torch.float32)
    x[1, 300] = x[1, 700] = 50.0  # a tie across chunks
    x[2, 10] = x[2, 11] = 50.0  # a tie within one
    x[3, -1] = 50.0  # the last column
    x[4] = float("-inf")
    assert torch.equal(ops.argmax(x), x.argmax(dim=-1))
    assert ops.argmax(x)[1:].tolist() == [300, 10, 999, 0]
    assert torch.equal(ops.argmax(x[:, ::2]), x[:, ::2].argmax(dim=-1))  # strided: torch's own


def test_kernels_reject_tensors_they_cannot_address(ops):
    with pytest.raises(ValueError, match="x must be a contiguous CPU tensor"):
        ops.fused_add_rms_norm(randn(4, 64, dtype=torch.float32).t(), randn(64, 4, dtype=torch.float32),
                               randn(4, dtype=torch.float32), 1e-6)
    q = randn(3, 4, 128, dtype=torch.float32)[:, :, :64]  # heads not packed
    with pytest.raises(ValueError, match="q must have packed heads"):
        ops.rotary_embedding((torch.arange(3), torch.zeros(8, 64)), q, q)
    cache = torch.zeros(4, 8, 2, 16)
    with pytest.raises(ValueError, match=r"k must be \(2, 16\) rows"):
        ops.store_kv(torch.zeros(3, 1, 16), torch.zeros(3, 2, 16), cache, cache, torch.arange(3))
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        ops.store_kv(torch.zeros(3, 2, 16), torch.zeros(3, 2, 16), cache, cache, torch.arange(3).int())


def test_select_ops_picks_the_c_kernels_on_a_cpu_where_they_cover_the_dtype():
    cpu = torch.device("cpu")
    assert isinstance(select_ops(cpu, torch.bfloat16), CpuOps)
    assert isinstance(select_ops(cpu, torch.float32), CpuOps)
    assert select_ops(cpu, torch.float16) is TorchOps  # no fp16 C kernels
    assert select_ops(cpu, torch.bfloat16, "torch") is TorchOps


@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("k", [576, 100])  # 100: not a multiple of the 32-wide dot product
def test_gemv_matches_f_linear(ops, rows, k):
    x, w, b = randn(rows, k, dtype=torch.bfloat16), randn(200, k, dtype=torch.bfloat16, seed=1), randn(200, dtype=torch.bfloat16, seed=2)
    expected = torch.nn.functional.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(ops.kernels.gemv(x, w, b).float(), expected, atol=0.05, rtol=1e-2)
    torch.testing.assert_close(ops.kernels.gemv(x, w).float(), expected - b.float(), atol=0.05, rtol=1e-2)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("k", [576, 100])
def test_gemv_of_float32_rows_by_bf16_weights_matches_a_float32_linear(ops, rows, k):
    x, w, b = randn(rows, k, dtype=torch.float32), randn(200, k, dtype=torch.bfloat16, seed=1), randn(200, dtype=torch.float32, seed=2)
    expected = torch.nn.functional.linear(x, w.float(), b)
    got = ops.kernels.gemv(x, w, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_upcast_linear_matches_a_float32_linear_across_blocks(monkeypatch):
    from conveyor.gpu_worker import parallel

    monkeypatch.setattr(parallel, "UPCAST_BLOCK_BYTES", 1)  # blocks of 64 rows: 64, 64, 64, 8
    x, w, b = randn(9, 96, dtype=torch.bfloat16), randn(200, 96, dtype=torch.bfloat16, seed=1), randn(200, dtype=torch.bfloat16, seed=2)
    expected = torch.nn.functional.linear(x.float(), w.float(), b.float()).bfloat16()
    torch.testing.assert_close(parallel.upcast_linear(x, w, b), expected, atol=1e-6, rtol=2**-8)  # one bf16 step


def test_gemv_refuses_more_rows_than_it_serves(ops):
    too_many = ops.kernels.gemv_max_rows + 1
    with pytest.raises(ValueError, match="at most"):
        ops.kernels.gemv(randn(too_many, 64, dtype=torch.bfloat16), randn(8, 64, dtype=torch.bfloat16))


def test_a_failed_kernel_build_warns_once_with_the_compilers_error(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_kernels, "_libraries", {})  # not tried yet in this process
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "cc --conveyor-no-such-option")
    assert cpu_kernels.load() is None and cpu_kernels.load() is None
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "plain torch" in warning.getMessage() and "conveyor-no-such-option" in warning.getMessage()


def test_a_dtype_without_c_kernels_warns_once_that_ops_run_in_torch(caplog):
    from conveyor.gpu_worker import ops as ops_module

    ops_module._warn_once.cache_clear()
    assert select_ops(torch.device("cpu"), torch.float16) is TorchOps
    assert select_ops(torch.device("cpu"), torch.float16) is TorchOps
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "torch.float16" in warning.getMessage() and "plain torch" in warning.getMessage()


def float32_linear(weight: torch.Tensor):
    from conveyor.gpu_worker.parallel import ColumnParallelLinear

    linear = ColumnParallelLinear(weight.shape[1], [weight.shape[0]], bias=True, dtype=torch.float32)
    linear.weight.data.copy_(weight)
    linear.bias.data.copy_(randn(weight.shape[0], dtype=torch.float32, seed=5))
    return linear


def test_a_float32_model_reads_small_batches_from_bf16_copies_of_bf16_exact_weights(ops):
    linear = float32_linear(randn(200, 96, dtype=torch.bfloat16).float())  # a bf16 checkpoint's weights
    ops.process_weights(torch.nn.Sequential(linear))
    assert linear.plain_weight.dtype == torch.bfloat16 and linear.weight.dtype == torch.float32
    for rows in (1, ops.kernels.gemv_max_rows, ops.kernels.gemv_max_rows + 1):  # the GEMV, then F.linear
        x = randn(rows, 96, dtype=torch.float32, seed=rows)
        torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias),
                                   atol=1e-4, rtol=1e-5)


def test_a_float32_model_keeps_weights_bf16_would_round_on_f_linear(ops):
    linear = float32_linear(randn(200, 96, dtype=torch.float32))
    ops.process_weights(torch.nn.Sequential(linear))
    assert linear.plain_weight is None and linear.gemv_max_rows == 0
