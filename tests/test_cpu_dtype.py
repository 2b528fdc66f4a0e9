"""dtype "auto" on a CPU: the dtype the CPU multiplies fastest, whatever machine the tests run on."""

import logging

import pytest
import torch

from conveyor.kernels.cpu import features
from conveyor.kernels.cpu.features import CpuFeatures, choose_dtype, limited, resolve_cpu_dtype

SAPPHIRE_RAPIDS = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
ZEN3 = frozenset({"avx2", "fma"})
ICE_LAKE = frozenset({"avx2", "fma", "avx512f"})  # AVX-512 without its bf16 instructions


@pytest.mark.parametrize("flags", [SAPPHIRE_RAPIDS, frozenset({"avx2", "avx512f", "avx512_bf16"})])
def test_auto_keeps_a_bf16_checkpoint_bf16_where_the_cpu_multiplies_bf16(flags):
    assert choose_dtype(torch.bfloat16, CpuFeatures("cpu", flags))[0] == torch.bfloat16


@pytest.mark.parametrize("flags", [ZEN3, ICE_LAKE, frozenset()])
@pytest.mark.parametrize("checkpoint", [torch.bfloat16, torch.float16])
def test_auto_computes_in_float32_where_bf16_would_be_emulated(flags, checkpoint):
    dtype, why = choose_dtype(checkpoint, CpuFeatures("cpu", flags))
    assert dtype == torch.float32 and "AVX512-BF16" in why


def test_auto_keeps_a_float32_checkpoint_float32_everywhere():
    assert choose_dtype(torch.float32, CpuFeatures("cpu", SAPPHIRE_RAPIDS))[0] == torch.float32


@pytest.mark.parametrize("environ", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"},
                                     {"ATEN_CPU_CAPABILITY": "default"}])
def test_emulation_limits_hide_avx512_and_amx(environ):
    flags, limits = limited(SAPPHIRE_RAPIDS, environ, "AVX512")
    assert flags == frozenset({"avx2", "fma"}) and limits
    assert not CpuFeatures("cpu", flags, limits).bf16_compute


def test_torch_dispatching_below_avx512_counts_as_a_limit():
    flags, limits = limited(SAPPHIRE_RAPIDS, {}, "AVX2")
    assert flags == frozenset({"avx2", "fma"}) and limits == ("torch capability AVX2",)


def test_limits_that_allow_avx512_change_nothing():
    assert limited(SAPPHIRE_RAPIDS, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "AVX512") == (SAPPHIRE_RAPIDS, ())


def test_auto_logs_the_features_and_the_choice(caplog):
    resolve_cpu_dtype.cache_clear()
    with caplog.at_level(logging.INFO, logger=features.__name__):
        assert resolve_cpu_dtype("auto", torch.bfloat16, CpuFeatures("EPYC 7B13", ZEN3)) == torch.float32
    (record,) = caplog.records
    assert record.levelname == "INFO"
    assert "EPYC 7B13: avx2 fma -avx512f -avx512_bf16 -amx_bf16" in record.getMessage()
    assert "float32" in record.getMessage()


def test_explicit_bf16_on_a_cpu_without_bf16_compute_runs_bf16_and_warns(caplog):
    resolve_cpu_dtype.cache_clear()
    assert resolve_cpu_dtype("bfloat16", torch.bfloat16, CpuFeatures("EPYC 7B13", ZEN3)) == torch.bfloat16
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "slow" in record.getMessage() and "AVX512-BF16" in record.getMessage()


def test_explicit_bf16_on_a_cpu_with_bf16_compute_does_not_warn(caplog):
    resolve_cpu_dtype.cache_clear()
    assert resolve_cpu_dtype("bfloat16", torch.bfloat16, CpuFeatures("Xeon", SAPPHIRE_RAPIDS)) == torch.bfloat16
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


class Bf16Checkpoint:
    torch_dtype = "bfloat16"


@pytest.mark.parametrize("flags,expected", [(ZEN3, torch.float32), (SAPPHIRE_RAPIDS, torch.bfloat16)])
def test_the_model_runner_resolves_auto_by_the_cpus_features(monkeypatch, flags, expected):
    from conveyor.config import EngineConfig
    from conveyor.gpu_worker.model_runner import resolve_dtype

    monkeypatch.setattr(features, "detect", lambda: CpuFeatures("cpu", flags))
    config = EngineConfig(model="unused")
    assert resolve_dtype(config, Bf16Checkpoint(), torch.device("cpu")) == expected
    assert resolve_dtype(config, Bf16Checkpoint(), torch.device("cuda")) == torch.bfloat16  # GPUs keep the checkpoint's
