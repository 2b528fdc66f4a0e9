"""The hot ops a model calls, chosen once per model runner: the C kernels of `kernels/cpu` on a CPU
(plain torch where they cannot be built, or on request), Triton kernels on CUDA.

Every op takes token-major tensors ([T, ...]); `attention` follows the paged-cache contract of
docs/architecture.md. This is the only place that decides which implementation runs.
"""

import functools
import logging
import os

import torch
import torch.nn.functional as F

from conveyor.gpu_worker.attention import AttentionMetadata, torch_paged_attention
from conveyor.gpu_worker.sampler import apply_penalties

logger = logging.getLogger(__name__)


class TorchOps:
    name = "torch"
    penalties = staticmethod(apply_penalties)  # the sampler's

    @staticmethod
    def process_weights(model: torch.nn.Module, gemv=None, gemv_max_rows: int = 0) -> None:
        """After loading: on a CPU, prepack bf16/fp16 linear weights for oneDNN (the same numbers
        as F.linear, faster), or, where oneDNN has no kernel for the dtype, have them multiply in
        float32. float32 stays on F.linear, which transformers matches bit for bit. With a `gemv`,
        batches of up to `gemv_max_rows` tokens use it on the plain weights, which packing then
        keeps as well (twice the linear weights' memory)."""
        dtype = next(model.parameters()).dtype
        if dtype == torch.float32 or next(model.parameters()).device.type != "cpu":
            return
        for module in model.modules():
            if hasattr(module, "pack"):
                module.pack(gemv, gemv_max_rows)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # transformers' order: normalise in float32, cast back, then scale (bit-equal to it)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    @classmethod
    def fused_add_rms_norm(
        cls, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x + residual
        return cls.rms_norm(residual, weight, eps), residual

    @staticmethod
    def prepare_rotary(positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype):
        """Once per step: the cos/sin rows of this step's positions, shared by every layer."""
        half = cos_sin_cache.shape[1] // 2
        cos_sin = cos_sin_cache[positions].unsqueeze(1).to(dtype)
        return cos_sin[..., :half], cos_sin[..., half:]

    @staticmethod
    def rotary_embedding(rope, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotation of q [T, H, D] and k [T, KVH, D]; returns new tensors."""
        cos, sin = rope
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def argmax(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    @staticmethod
    def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        # The CPU runner never pads, so every slot is a real one.
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)

    @staticmethod
    def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, sliding_window: int | None) -> torch.Tensor:
        return torch_paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)


    @staticmethod
    def lora_shrink(x: torch.Tensor, rows: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
        """x[rows] A^T in float32 (rows None: every row of x)."""
        xs = x if rows is None else x.index_select(0, rows)
        return F.linear(xs.float(), a.float())

    @staticmethod
    def lora_expand(s: torch.Tensor, rows: torch.Tensor | None, b: torch.Tensor, y: torch.Tensor,
                    offset: int) -> None:
        """y[rows, offset:offset+N] += s B^T, in place."""
        out = y.narrow(1, offset, b.shape[0])
        delta = F.linear(s, b.float()).to(y.dtype)
        if rows is None:
            out += delta
        else:
            out.index_add_(0, rows, delta)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1] * 2
    x1, x2 = x[..., : rot // 2], x[..., rot // 2 : rot]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated if rot == x.shape[-1] else torch.cat((rotated, x[..., rot:]), dim=-1)


class CpuOps(TorchOps):
    """TorchOps with the C kernels of `kernels/cpu` for float32 and bfloat16: attention (decodes
    and prefills) straight from the paged cache, the KV store, the logits' argmax, and the
    element-wise ops in one pass each (in place where the Triton ops are too)."""

    name = "cpu"

    def __init__(self, kernels):
        self.kernels = kernels

    def process_weights(self, model: torch.nn.Module) -> None:
        """bf16: as TorchOps, with the GEMV for small batches. float32: small batches read a bf16
        copy of each linear weight that bf16 holds exactly (a bf16 checkpoint's) through the GEMV,
        which computes in float32 from half the bytes; larger ones keep F.linear."""
        dtype = next(model.parameters()).dtype
        if dtype == torch.bfloat16:
            TorchOps.process_weights(model, self.kernels.gemv, self.kernels.gemv_max_rows)
        elif dtype == torch.float32:
            for module in model.modules():
                if hasattr(module, "use_gemv") and getattr(module, "qweight", None) is None:  # quantized: own kernel
                    weight = module.weight.data
                    held = weight.bfloat16()
                    if torch.equal(held.float(), weight):
                        module.use_gemv(self.kernels.gemv, self.kernels.gemv_max_rows, held)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.kernels.rms_norm(x, weight, eps)

    def fused_add_rms_norm(self, x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.fused_add_rms_norm(x, residual, weight, eps)

    @staticmethod
    def prepare_rotary(positions, cos_sin_cache, dtype):
        return positions, cos_sin_cache  # the kernel looks rows up itself

    def rotary_embedding(self, rope, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions, cos_sin_cache = rope
        self.kernels.rotary_neox(positions, q, k, cos_sin_cache)
        return q, k

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_and_mul(x)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        self.kernels.store_kv(k, v, k_cache, v_cache, slot_mapping)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dtype == torch.float32 and logits.dim() == 2 and logits.is_contiguous():
            return self.kernels.argmax(logits)
        return super().argmax(logits)

    def attention(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                  sliding_window: int | None) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype)
        return self.kernels.paged_attention(q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens,
                                            meta.query_start_loc, scale, sliding_window)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def select_ops(device: torch.device, dtype: torch.dtype, backend: str = "auto"):
    """`auto`: Triton on CUDA; on a CPU the C kernels, or torch where they cannot be built or do not
    cover the dtype. `torch` forces plain torch ops (the reference path). `triton` on a CPU is
    allowed only under the interpreter (TRITON_INTERPRET=1), which tests use to prove the wiring."""
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton"
        else:
            from conveyor.kernels import cpu

            kernels = cpu.load()  # warns once where they cannot be built
            if kernels is not None and kernels.supports(dtype):
                return CpuOps(kernels)
            if kernels is not None:
                _warn_once(f"Conveyor's C kernels for the CPU do not cover {dtype}, so every CPU op runs in "
                           "plain torch, which is slower; float32 and bfloat16 have them")
            backend = "torch"
    if backend == "torch":
        return TorchOps
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1 for testing)")
        from conveyor.gpu_worker.triton_ops import TritonOps

        return TritonOps
    raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {backend!r}")
