"""Every Triton kernel compiles for an H100 (sm_90), checked on this CPU-only machine.

The interpreter runs the kernels' logic but not the GPU compiler, which rejects things the
interpreter accepts (tl.dot shapes, loop-carried types, dtype mixes). bf16 attention is the
variant the interpreter never runs natively (it upcasts bf16 there), so it is the one compiled.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not ptxas.exists(), reason="this Triton build has no bundled ptxas")
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "conveyor.tools.bench_kernels", "--compile-check",
         "--attention-dtypes", "bf16"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
