"""The hot ops as Triton kernels (CUDA; or CPU tensors under TRITON_INTERPRET=1 for tests).
Same interface as `ops.TorchOps`; the kernels live in `kernels/`."""

import torch

from conveyor.gpu_worker.attention import AttentionMetadata
from conveyor.kernels.activation import silu_and_mul
from conveyor.kernels.attention import paged_attention
from conveyor.kernels.kv_store import store_kv
from conveyor.kernels.lora import lora_expand, lora_shrink
from conveyor.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from conveyor.kernels.rotary import rotary_embedding
from conveyor.kernels.sampling import apply_penalties


class TritonOps:
    name = "triton"

    @staticmethod
    def process_weights(model: torch.nn.Module) -> None:
        pass  # cuBLAS takes the weights as they are

    @staticmethod
    def argmax(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=-1)

    penalties = staticmethod(apply_penalties)  # the sampler's, in place on float32 logits
    lora_shrink = staticmethod(lora_shrink)
    lora_expand = staticmethod(lora_expand)  # in place on the layer's output

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # per-head norms (q/k) arrive as [T, H, D]
        return rms_norm(rows, weight, eps).view(x.shape)

    @staticmethod
    def fused_add_rms_norm(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_add_rms_norm(x, residual, weight, eps)  # in place on both

    @staticmethod
    def prepare_rotary(positions, cos_sin_cache, dtype):
        return positions, cos_sin_cache  # the kernel looks rows up itself

    @staticmethod
    def rotary_embedding(rope, q, k) -> tuple[torch.Tensor, torch.Tensor]:
        positions, cos_sin_cache = rope
        rotary_embedding(positions, q, k, cos_sin_cache, q.shape[-1], is_neox=True)
        return q, k

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)

    @staticmethod
    def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
        store_kv(k, v, k_cache, v_cache, slot_mapping)

    @staticmethod
    def attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                  sliding_window: int | None) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return paged_attention(
            q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            scale=scale, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
            sliding_window=sliding_window, num_decodes=meta.num_decodes,
        )
