"""CPU kernels in C (this folder's *.c), compiled on first use and called through ctypes.

They are built once per source, compiler and CPU with the system C compiler (`CC`, default `cc`),
tuned for the host (-O3 -march=native) and threaded with OpenMP; the library is cached under
$CONVEYOR_CACHE_DIR (default ~/.cache/conveyor). Loaded after torch, the library's OpenMP calls
resolve to the libgomp torch already loaded, so both share one thread pool.

Where no compiler works, `load()` returns None (with one warning) and callers keep their torch path.
ctypes releases the GIL for the duration of each call.
"""

import ctypes
import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
import threading

import torch

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(__file__), "attention.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-fPIC", "-shared", "-std=c11", "-fopenmp"]

_lock = threading.Lock()
_library: "CpuKernels | None | bool" = False  # False: not tried yet


def cache_dir() -> str:
    root = os.environ.get("CONVEYOR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "conveyor")
    return os.path.join(root, "cpu_kernels")


def _cpu_signature() -> str:
    """-march=native code must not run on another CPU: the cache key includes the CPU's features."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform

        return platform.processor() + platform.machine()


def _build(compiler: list[str]) -> str:
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(compiler + FLAGS).encode(), _cpu_signature().encode()]))
    path = os.path.join(cache_dir(), f"conveyor_cpu_{key.hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Build beside the target, then rename: concurrent workers never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        subprocess.run([*compiler, *FLAGS, SOURCE, "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class CpuKernels:
    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        self._decode_attention = {}
        for dtype, name in ((torch.float32, "decode_attention_f32"), (torch.bfloat16, "decode_attention_bf16")):
            fn = getattr(lib, name)
            fn.argtypes = [ptr] * 6 + [i32] * 6 + [f32, i32, i32]
            fn.restype = i32
            self._decode_attention[dtype] = fn

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self._decode_attention

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         sliding_window: int | None) -> torch.Tensor:
        """out[b] = softmax(q[b] . K_b^T * scale) V_b for one query token per sequence b, reading
        K_b and V_b through its block table. All tensors contiguous CPU tensors of the layouts in
        attention.c; rows of out whose sequence is empty are left as they were."""
        num_seqs, num_heads, head_dim = q.shape
        _, block_size, num_kv_heads, _ = k_cache.shape
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out),
                        ("block_tables", block_tables), ("seq_lens", seq_lens)):
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"{name} must be a contiguous CPU tensor")
        if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
            raise ValueError("block_tables and seq_lens must be int32")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        status = self._decode_attention[q.dtype](
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), block_tables.data_ptr(),
            seq_lens.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size,
            block_tables.shape[1], scale, sliding_window or 0, torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("decode attention could not allocate its scratch buffers")
        return out


def load() -> CpuKernels | None:
    """The compiled kernels, or None where they cannot be built here (warned once)."""
    global _library
    with _lock:
        if _library is False:
            compiler = shlex.split(os.environ.get("CC", "cc"))
            try:
                _library = CpuKernels(_build(compiler))
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", None) or exc
                logger.warning("CPU kernels unavailable (%s); using the slower torch path", detail)
                _library = None
        return _library
