"""CPU kernels in C (this folder's *.c): paged attention, the KV store, the element-wise ops, the
logits' argmax and a bf16 GEMV, compiled on first use and called through ctypes.

They are built once per source, compiler and CPU with the system C compiler (`CC`, default `cc`),
tuned for the host (-O3 -march=$CONVEYOR_CPU_ARCH, default native) and threaded with OpenMP;
AVX512-BF16 paths are taken where the target has it, portable C elsewhere. The library is cached under
$CONVEYOR_CACHE_DIR (default ~/.cache/conveyor). Loaded after torch, the library's OpenMP calls
resolve to the libgomp torch already loaded, so both share one thread pool.

Where they cannot be built, `load()` returns None and warns once, with the compiler's error, and
callers keep their torch path.
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

from conveyor.kernels.quant import BLOCK as QUANT_BLOCK

logger = logging.getLogger(__name__)

HERE = os.path.dirname(__file__)
SOURCES = [os.path.join(HERE, name) for name in ("attention.c", "elementwise.c", "gemv.c", "quant.c")]
HEADERS = [os.path.join(HERE, "common.h")]
FLAGS = ["-O3", f"-march={os.environ.get('CONVEYOR_CPU_ARCH', 'native')}", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-fPIC", "-shared", "-std=c11", "-fopenmp"]

_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
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
    parts = []
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            parts.append(f.read())
    key = hashlib.sha256(b"\0".join([*parts, " ".join(compiler + FLAGS).encode(), _cpu_signature().encode()]))
    path = os.path.join(cache_dir(), f"conveyor_cpu_{key.hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Build beside the target, then rename: concurrent workers never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        subprocess.run([*compiler, *FLAGS, *SOURCES, "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_cpu_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous CPU tensor")


def _check_quant_blocks(blocks: torch.Tensor, qtype: int, n: int, k: int) -> None:
    block_size, block_bytes = QUANT_BLOCK.get(qtype, (0, 0))
    if not block_size or k <= 0 or k % block_size:
        raise ValueError(f"qtype must be one of {[int(t) for t in QUANT_BLOCK]} with K a positive multiple of its "
                         f"block size, got type {qtype}, K {k}")
    if (blocks.dtype != torch.uint8 or blocks.numel() < n * k // block_size * block_bytes
            or not blocks.is_contiguous() or blocks.device.type != "cpu"):
        raise ValueError(f"blocks must be contiguous CPU uint8 holding {n} rows of {k // block_size * block_bytes} "
                         f"bytes, got {blocks.dtype} {tuple(blocks.shape)} on {blocks.device}")


class CpuKernels:
    """The compiled library's entry points, for float32 and bfloat16 tensors (`supports`)."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        ptr, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
        signatures = {  # name: (argument types, return type)
            "paged_attention": ([ptr, i64] + [ptr] * 6 + [i32] * 6 + [f32, i32, i32], i32),
            "rms_norm": ([ptr, i64, ptr, ptr, i64, i32, f32, i32], None),
            "fused_add_rms_norm": ([ptr, ptr, ptr, i64, i32, f32, i32], None),
            "silu_and_mul": ([ptr, ptr, i64, i32, i32], None),
            "rotary_neox": ([ptr, ptr, i64, i32, ptr, i64, i32, i32, i32, ptr, i64, i32], None),
        }
        self._fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        for name, (argtypes, restype) in signatures.items():
            for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = argtypes, restype
                self._fns[name, dtype] = fn
        self._argmax = lib.argmax_rows_f32
        self._argmax.argtypes, self._argmax.restype = [ptr, i64, i64, ptr, i32], None
        self._store_kv = lib.store_kv
        self._store_kv.argtypes, self._store_kv.restype = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, i32], None
        self._gemv = lib.gemv_bf16
        self._gemv.argtypes, self._gemv.restype = [ptr, ptr, ptr, ptr, i32, i32, i32, i32], i32
        self.gemv_max_rows = lib.gemv_max_rows()
        self._quant_gemv = lib.quant_gemv
        self._quant_gemv.argtypes, self._quant_gemv.restype = [i32, ptr, ptr, ptr, ptr, i32, i64, i64, i32, i32], i32
        self._quant_dequantize = lib.quant_dequantize
        self._quant_dequantize.argtypes, self._quant_dequantize.restype = [i32, ptr, ptr, i64, i64, i32], i32

    @staticmethod
    def supports(dtype: torch.dtype) -> bool:
        return dtype in (torch.float32, torch.bfloat16)

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        scale: float, sliding_window: int | None) -> torch.Tensor:
        """Causal attention of every query token of a step over its sequence's context, read
        through the block table (layouts in attention.c): q [T, H, D] (tokens may be strided,
        heads packed), out [T, H, D]. Decodes and prefill chunks mix freely. Rows of out whose
        sequence is empty (seq_len 0) are left as they were."""
        num_tokens, num_heads, head_dim = q.shape
        _, block_size, num_kv_heads, _ = k_cache.shape
        _check_cpu_contiguous(k_cache=k_cache, v_cache=v_cache, out=out, block_tables=block_tables,
                              seq_lens=seq_lens, query_start_loc=query_start_loc)
        if q.device.type != "cpu" or q.stride(2) != 1 or q.stride(1) != head_dim:
            raise ValueError("q must be a CPU tensor [T, H, D] with each token's heads packed")
        if (block_tables.dtype, seq_lens.dtype, query_start_loc.dtype) != (torch.int32,) * 3:
            raise ValueError("block_tables, seq_lens and query_start_loc must be int32")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        if len(query_start_loc) != len(seq_lens) + 1 or int(query_start_loc[-1]) != num_tokens:
            raise ValueError(f"query_start_loc must have num_seqs + 1 entries ending at {num_tokens} tokens")
        status = self._fns["paged_attention", q.dtype](
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
            block_tables.data_ptr(), seq_lens.data_ptr(), query_start_loc.data_ptr(), len(seq_lens), num_heads,
            num_kv_heads, head_dim, block_size, block_tables.shape[1], scale, sliding_window or 0,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("paged attention could not allocate its scratch buffers")
        return out

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """The index of each row's maximum (the first, on ties) of x [rows, cols] float32, as
        torch.argmax(x, -1), which runs on one thread."""
        _check_cpu_contiguous(x=x)
        if x.dtype != torch.float32 or x.dim() != 2:
            raise ValueError(f"x must be a 2-d float32 tensor, got {x.dim()}-d {x.dtype}")
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
        return out

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """k and v [T, KVH, D] (tokens may be strided, each token's heads packed) into their slots
        of k_cache and v_cache [num_blocks, block_size, KVH, D]; slot -1 is padding, skipped."""
        _check_cpu_contiguous(k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
        for name, t in (("k", k), ("v", v)):
            if t.device.type != "cpu" or t.stride(2) != 1 or t.stride(1) != t.shape[2]:
                raise ValueError(f"{name} must be a CPU tensor [T, KVH, D] with each token's heads packed")
            if t.shape[1:] != k_cache.shape[2:] or t.dtype != k_cache.dtype:
                raise ValueError(f"{name} must be {tuple(k_cache.shape[2:])} rows of {k_cache.dtype}, got "
                                 f"{tuple(t.shape[1:])} of {t.dtype}")
        if slot_mapping.dtype != torch.int64 or len(slot_mapping) != len(k) or len(v) != len(k):
            raise ValueError("slot_mapping must be int64 with one slot per row of k and v")
        size = k.element_size()
        self._store_kv(k.data_ptr(), k.stride(0) * size, v.data_ptr(), v.stride(0) * size, k_cache.data_ptr(),
                       v_cache.data_ptr(), slot_mapping.data_ptr(), len(k), k.shape[1] * k.shape[2] * size,
                       torch.get_num_threads())

    def gemv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] @ weight [N, K]^T (+ bias) for bf16 and M <= gemv_max_rows: a linear layer of a
        small batch, read at memory speed."""
        if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.shape[0] > self.gemv_max_rows:
            raise ValueError(f"gemv takes bf16 and at most {self.gemv_max_rows} rows, got {x.dtype} "
                             f"{tuple(x.shape)} and {weight.dtype}")
        x = x.contiguous()
        _check_cpu_contiguous(weight=weight)
        y = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
        self._gemv(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                   x.shape[0], weight.shape[0], weight.shape[1], torch.get_num_threads())
        return y

    def quant_gemv(self, x: torch.Tensor, blocks: torch.Tensor, qtype: int, shape: tuple[int, int],
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] @ W^T (+ bias) for W [N, K] = `shape` held as ggml blocks of type `qtype` (raw
        uint8 `blocks`, layouts in quant.c), each weight block read once for all M rows; x, bias and
        the result are float32 or bf16, contiguous. Lean: it runs once per linear layer a step."""
        n, k = shape
        dtype = x.dtype
        if (x.dim() != 2 or x.shape[1] != k or dtype not in _ACTIVATION_DTYPES or not x.is_contiguous()
                or x.device.type != "cpu" or not x.shape[0]):
            raise ValueError(f"x must be a contiguous CPU tensor [M >= 1, {k}] of float32 or bf16, got "
                             f"{tuple(x.shape)} {dtype} on {x.device}")
        _check_quant_blocks(blocks, qtype, n, k)
        if bias is not None and (bias.shape != (n,) or bias.dtype != dtype or not bias.is_contiguous()):
            raise ValueError(f"bias must be contiguous [{n}] {dtype}, got {tuple(bias.shape)} {bias.dtype}")
        y = torch.empty((x.shape[0], n), dtype=dtype)
        if self._quant_gemv(qtype, blocks.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(),
                            y.data_ptr(), x.shape[0], n, k, dtype is torch.bfloat16, torch.get_num_threads()):
            raise MemoryError("quant_gemv could not allocate float32 rows of x")
        return y

    def quant_dequantize(self, blocks: torch.Tensor, qtype: int, shape: tuple[int, int],
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """W [N, K] = `shape` from its ggml blocks (raw uint8, rows [0, N) of `blocks`) as float32,
        into `out` (contiguous, at least N*K elements) when given."""
        n, k = shape
        _check_quant_blocks(blocks, qtype, n, k)
        out = torch.empty(n, k) if out is None else out.view(-1)[: n * k].view(n, k)
        self._quant_dequantize(qtype, blocks.data_ptr(), out.data_ptr(), n, k, torch.get_num_threads())
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., D], rows of D contiguous (rows may be strided) -> a new contiguous tensor."""
        rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape, dtype=x.dtype)
        self._fns["rms_norm", x.dtype](rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(),
                                       rows.shape[0], rows.shape[1], eps, torch.get_num_threads())
        return out.view(x.shape)

    def fused_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: residual += x, then x = rms_norm(residual). Returns (x, residual)."""
        _check_cpu_contiguous(x=x, residual=residual)
        self._fns["fused_add_rms_norm", x.dtype](x.data_ptr(), residual.data_ptr(), weight.data_ptr(),
                                                 x.numel() // x.shape[-1], x.shape[-1], eps,
                                                 torch.get_num_threads())
        return x, residual

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2*D] -> silu(x[:, :D]) * x[:, D:]."""
        _check_cpu_contiguous(x=x)
        out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype)
        self._fns["silu_and_mul", x.dtype](x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                                           out.shape[-1], torch.get_num_threads())
        return out

    def rotary_neox(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    cos_sin_cache: torch.Tensor) -> None:
        """Rotates q [T, H, D] and k [T, KVH, D] in place (tokens may be strided, heads must be
        packed); cos_sin_cache [max_position, rot_dim] float32 rotates the first rot_dim dims."""
        for name, t in (("q", q), ("k", k)):
            if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
                raise ValueError(f"{name} must have packed heads (strides [*, {t.shape[2]}, 1])")
        _check_cpu_contiguous(positions=positions, cos_sin_cache=cos_sin_cache)
        if positions.dtype != torch.int64 or cos_sin_cache.dtype != torch.float32:
            raise ValueError("positions must be int64 and cos_sin_cache float32")
        self._fns["rotary_neox", q.dtype](
            positions.data_ptr(), q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1],
            q.shape[2], cos_sin_cache.shape[1], cos_sin_cache.data_ptr(), q.shape[0], torch.get_num_threads(),
        )


def load() -> CpuKernels | None:
    """The compiled kernels, or None where they cannot be built here (warned once)."""
    global _library
    with _lock:
        if _library is False:
            compiler = shlex.split(os.environ.get("CC", "cc"))
            try:
                _library = CpuKernels(_build(compiler))
            except (OSError, subprocess.SubprocessError) as exc:
                reason = (getattr(exc, "stderr", None) or str(exc)).strip()
                logger.warning("Conveyor's C kernels for the CPU could not be built, so every CPU op runs in "
                               "plain torch, which is slower. Reason: %s", reason)
                _library = None
        return _library
