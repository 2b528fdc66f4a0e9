"""Weight-only quantized weights kept in llama.cpp's block formats, byte for byte as a GGUF file
holds them, so a GGUF tensor's raw bytes are used as they are.

Each row of a weight [N, K] is K / block_size blocks (layouts in kernels/cpu/quant.c). `dequantize`
and `quantize` are the torch references: `dequantize` gives the values gguf's dequantizer gives,
`quantize` the bytes gguf's quantizer writes, so a Hugging Face model quantized at load time
(`LOAD_TIME_TYPES`) runs on the same kernels as a GGUF file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class QuantType(enum.IntEnum):
    """ggml's type ids (gguf.GGMLQuantizationType) of the formats the kernels take."""

    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    Q4_K = 12


# type: (elements per block, bytes per block)
BLOCK = {QuantType.Q4_0: (32, 18), QuantType.Q4_1: (32, 20), QuantType.Q8_0: (32, 34), QuantType.Q4_K: (256, 144)}
LOAD_TIME_TYPES = {"int8": QuantType.Q8_0, "int4": QuantType.Q4_1}


@dataclass(slots=True)
class QuantizedWeight:
    """A weight [N, K] = `shape` as ggml blocks: `blocks` uint8 [N, K / block_size * block_bytes]."""

    blocks: torch.Tensor
    qtype: QuantType
    shape: tuple[int, int]

    def __post_init__(self):
        self.qtype = QuantType(self.qtype)
        n, k = self.shape
        block_size, block_bytes = BLOCK[self.qtype]
        if k <= 0 or k % block_size:
            raise ValueError(f"K must be a positive multiple of {block_size} for {self.qtype.name}, got {k}")
        want = (n, k // block_size * block_bytes)
        if self.blocks.dtype != torch.uint8 or tuple(self.blocks.shape) != want or not self.blocks.is_contiguous():
            raise ValueError(f"blocks must be contiguous uint8 {list(want)} for a {self.qtype.name} weight "
                             f"{[n, k]}, got {self.blocks.dtype} {list(self.blocks.shape)}")

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(self.blocks.to(device), self.qtype, self.shape)

    def narrow(self, dim: int, start: int, length: int) -> QuantizedWeight:
        """Rows (dim 0) or columns (dim 1, on block boundaries) [start, start + length): a
        tensor-parallel shard, as Tensor.narrow."""
        n, k = self.shape
        if dim == 0:
            return QuantizedWeight(self.blocks[start:start + length], self.qtype, (length, k))
        block_size, block_bytes = BLOCK[self.qtype]
        if dim != 1 or start % block_size or length % block_size:
            raise ValueError(f"narrow takes dim 0, or dim 1 with start and length multiples of {block_size} "
                             f"for {self.qtype.name}, got dim {dim}, start {start}, length {length}")
        first = start // block_size * block_bytes
        columns = self.blocks[:, first:first + length // block_size * block_bytes].contiguous()
        return QuantizedWeight(columns, self.qtype, (n, length))

    @staticmethod
    def cat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
        """One weight of the rows of several of one type and K: a fused projection (qkv, gate_up)."""
        qtype, k = weights[0].qtype, weights[0].shape[1]
        if any(w.qtype != qtype or w.shape[1] != k for w in weights):
            raise ValueError(f"cat_rows takes weights of one type and K, got "
                             f"{[(w.qtype.name, w.shape[1]) for w in weights]}")
        return QuantizedWeight(torch.cat([w.blocks for w in weights]), qtype, (sum(w.shape[0] for w in weights), k))


def _fp16(two_bytes: torch.Tensor) -> torch.Tensor:
    return two_bytes.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., B] bytes -> [..., 2B] codes: the low nibbles, then the high ones."""
    return torch.cat([qs & 15, qs >> 4], dim=-1).float()


def _q4k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes a super-block -> 8 six-bit scales and 8 mins (llama.cpp's get_scale_min_k4)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scales.float(), mins.float()


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] as `dtype`, on the blocks' device: gguf.quants.dequantize's values."""
    n, k = weight.shape
    b = weight.blocks.view(-1, BLOCK[weight.qtype][1])
    d = _fp16(b[:, 0:2])
    if weight.qtype == QuantType.Q8_0:
        w = b[:, 2:].contiguous().view(torch.int8).float() * d
    elif weight.qtype == QuantType.Q4_0:
        w = d * (_nibbles(b[:, 2:]) - 8)
    elif weight.qtype == QuantType.Q4_1:
        w = d * _nibbles(b[:, 4:]) + _fp16(b[:, 2:4])
    else:
        scales, mins = _q4k_scales_mins(b[:, 4:16])
        codes = _nibbles(b[:, 16:].view(-1, 4, 32)).view(-1, 8, 32)
        w = (d * scales).unsqueeze(-1) * codes - (_fp16(b[:, 2:4]) * mins).unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as ggml's roundf (and gguf's np_roundf) does."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    return codes[:, :16] | (codes[:, 16:] << 4)


def _reciprocal_or_zero(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _as_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).view(torch.uint8)


def quantize(weight: torch.Tensor, qtype: QuantType) -> QuantizedWeight:
    """A float weight [N, K] as Q8_0, Q4_0 or Q4_1 blocks: the bytes gguf.quants.quantize writes
    for its float32 values (round-to-nearest per 32-block scale; Q4_1 with the block's minimum)."""
    qtype = QuantType(qtype)
    if qtype not in (QuantType.Q8_0, QuantType.Q4_0, QuantType.Q4_1):
        raise ValueError(f"quantize makes Q8_0, Q4_0 or Q4_1 blocks, got {qtype.name}")
    if weight.dim() != 2 or weight.shape[1] % 32 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-d float tensor [N, K] with K a multiple of 32, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    x = weight.detach().float().reshape(-1, 32)
    if qtype == QuantType.Q8_0:
        d = x.abs().amax(dim=1, keepdim=True) / 127
        codes = _roundf(x * _reciprocal_or_zero(d)).to(torch.int8).view(torch.uint8)
        parts = [_as_bytes(d), codes]
    elif qtype == QuantType.Q4_0:
        extreme = x.gather(1, x.abs().argmax(dim=1, keepdim=True))
        d = extreme / -8
        codes = torch.trunc(x * _reciprocal_or_zero(d) + 8.5).to(torch.uint8).clamp(0, 15)
        parts = [_as_bytes(d), _pack_nibbles(codes)]
    else:
        lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        d = (hi - lo) / 15
        codes = torch.trunc((x - lo) * _reciprocal_or_zero(d) + 0.5).to(torch.uint8).clamp(0, 15)
        parts = [_as_bytes(d), _as_bytes(lo), _pack_nibbles(codes)]
    blocks = torch.cat(parts, dim=1).reshape(n, -1)
    return QuantizedWeight(blocks, qtype, (n, k))
