"""Tensor-parallel layers: column/row-parallel linears, vocab-parallel embedding and LM head.

Each rank holds a slice of every weight; a rank's `load_weight` takes the full checkpoint tensor
and copies out its own shard, so checkpoints load unchanged at any tensor-parallel size. A linear
layer and the LM head given a QuantizedWeight keep it (`qweight`, sharded along whole blocks) and
multiply with it (`quantized_linear`); their float weight is then empty.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conveyor.kernels.quant import BLOCK, QuantizedWeight, dequantize
from conveyor.kernels.quant_linear import quantized_linear

_tp_rank = 0
_tp_size = 1


def init_tensor_parallel(rank: int, size: int) -> None:
    global _tp_rank, _tp_size
    _tp_rank, _tp_size = rank, size


def tp_size() -> int:
    return _tp_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp_size > 1:
        dist.all_reduce(x)
    return x


def check_shape(name: str, tensor: torch.Tensor, shape) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) must be divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator


def empty_like_rows(param: torch.Tensor) -> nn.Parameter:
    """A float weight of no rows: what stands in for a weight kept quantized."""
    return nn.Parameter(param.new_empty(0, *param.shape[1:]), requires_grad=False)


def copy_dequantized(rows: torch.Tensor, weight: QuantizedWeight, chunk: int = 4096) -> None:
    """rows[:] = weight's values, a chunk of rows at a time (a vocabulary's float32 whole is large)."""
    for start in range(0, weight.shape[0], chunk):
        length = min(chunk, weight.shape[0] - start)
        rows[start:start + length].copy_(dequantize(weight.narrow(0, start, length), rows.dtype))


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight reordered into oneDNN's blocked layout (CPU), or None where this CPU has no
    oneDNN kernel for its dtype. A packed matmul skips the per-call reorder F.linear does."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    except RuntimeError:
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


UPCAST_BLOCK_BYTES = 2 << 20  # float32 rows of W converted at a time: they stay in cache for the matmul


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) in float32, W converted a block of rows at a time, rounded back to x's dtype.
    Where oneDNN has no bf16 kernel (AVX2 CPUs), torch's own bf16 matmul of more than a few rows
    is 5-15 times slower than this."""
    n, k = weight.shape
    rows = max(64, UPCAST_BLOCK_BYTES // (4 * k))
    x32, block = x.float(), torch.empty(min(rows, n), k)
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    for start in range(0, n, rows):
        w32 = block[: min(rows, n - start)].copy_(weight[start:start + rows])
        out[:, start:start + rows] = F.linear(x32, w32, None if bias is None else bias[start:start + rows].float())
    return out


class SmallBatchGemv:
    """A few rows of x may go to a GEMV kernel that reads `plain_weight`: the layer's own weight
    before packing, or a bf16 copy of a float32 one that bf16 holds exactly (half the bytes)."""

    plain_weight: torch.Tensor | None = None
    gemv = None  # (x, weight, bias) -> y for x of at most gemv_max_rows rows
    gemv_max_rows = 0

    def use_gemv(self, gemv, gemv_max_rows: int, weight: torch.Tensor) -> None:
        self.plain_weight, self.gemv, self.gemv_max_rows = weight, gemv, gemv_max_rows


class LinearBase(SmallBatchGemv, nn.Module):
    """A weight used as y = x W^T: as is (F.linear), or, once `pack`ed for a CPU, prepacked for
    oneDNN or else multiplied in float32 (`upcast_linear`); a few rows of x may go to a GEMV."""

    weight: nn.Parameter
    qweight: QuantizedWeight | None = None
    packed = False
    upcast = False
    lora = None  # a LoRALayer (gpu_worker/lora.py) where the engine serves adapters

    def __init__(self, num_parts: int):
        super().__init__()
        self.num_parts = num_parts
        self.parts_loaded: set[int] = set()
        self.quantized_parts: dict[int, tuple[int, QuantizedWeight]] = {}  # part -> (first row, shard)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.qweight is not None:
            return quantized_linear(x, self.qweight, bias)
        if x.shape[0] <= self.gemv_max_rows:
            return self.gemv(x, self.plain_weight, bias)
        if self.packed:
            return packed_linear(x, self.weight, bias)
        if self.upcast:
            return upcast_linear(x, self.weight, bias)
        return F.linear(x, self.weight, bias)

    def pack(self, gemv=None, gemv_max_rows: int = 0) -> bool:
        """Once all weights are loaded: replace the weight with its packed form (keeping the plain
        one too when a `gemv`, for batches of up to `gemv_max_rows` tokens, is given), or, where
        oneDNN cannot pack this dtype, multiply in float32. Returns whether it packed."""
        if self.qweight is not None:
            return False
        if gemv is not None:
            self.use_gemv(gemv, gemv_max_rows, self.weight.data)
        packed = pack_linear_weight(self.weight)
        if packed is None:
            self.upcast = True
        else:
            self.weight, self.packed = nn.Parameter(packed, requires_grad=False), True
        return self.packed

    def load_weight_rows(self, param: torch.Tensor, shard: torch.Tensor | QuantizedWeight, part: int,
                         offset: int) -> None:
        """A part's shard of the weight at row `offset`. Quantized parts wait for the others: the
        weight stays quantized where every part is, of one type; else they are dequantized into it."""
        if isinstance(shard, QuantizedWeight):
            self.quantized_parts[part] = (offset, shard)
        else:
            param.data.narrow(0, offset, shard.shape[0]).copy_(shard)
        self.parts_loaded.add(part)
        if len(self.parts_loaded) < self.num_parts or not self.quantized_parts:
            return
        parts = [shard for _, (_, shard) in sorted(self.quantized_parts.items())]
        if len(parts) == self.num_parts and len({w.qtype for w in parts}) == 1:
            self.qweight = (QuantizedWeight.cat_rows(parts) if len(parts) > 1 else parts[0]).to(param.device)
            self.weight = empty_like_rows(param)
        else:
            for offset, weight in self.quantized_parts.values():
                copy_dequantized(param.data.narrow(0, offset, weight.shape[0]), weight)
        self.quantized_parts = {}


class ColumnParallelLinear(LinearBase):
    """y = x W^T + b with W split along its output rows; `output_sizes` names the stacked parts
    (e.g. q, k, v), each sharded separately so every rank gets its slice of each."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, dtype: torch.dtype):
        super().__init__(len(output_sizes))
        self.output_sizes = [divide(s, _tp_size, "linear output size") for s in output_sizes]
        self.weight = nn.Parameter(torch.empty(sum(self.output_sizes), input_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.output_sizes), dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias)
        if self.lora is not None:
            self.lora.apply(x, y)
        return y

    def lora_shard(self, a: torch.Tensor, b: torch.Tensor, part: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA pair of `part` as this rank holds it: A whole, B's rows of the rank's output slice."""
        size = self.output_sizes[part]
        return a, b.narrow(0, _tp_rank * size, size)

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, part: int, name: str) -> None:
        size = self.output_sizes[part]
        check_shape(name, loaded, (size * _tp_size, *param.shape[1:]))
        offset = sum(self.output_sizes[:part])
        shard = loaded.narrow(0, _tp_rank * size, size)
        if param.dim() == 1:
            param.data.narrow(0, offset, size).copy_(shard)
        else:
            self.load_weight_rows(param, shard, part, offset)


class RowParallelLinear(LinearBase):
    """y = x W^T + b with W split along its input columns; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype):
        super().__init__(1)
        self.output_size = output_size
        self.input_size = divide(input_size, _tp_size, "linear input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.lora is not None:
            self.lora.apply(x, y)  # a partial sum, as the base layer's: the all-reduce completes both
        y = all_reduce(y)
        return y if self.bias is None else y + self.bias

    def lora_shard(self, a: torch.Tensor, b: torch.Tensor, part: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A LoRA pair as this rank holds it: A's columns of the rank's input slice, B whole."""
        return a.narrow(1, _tp_rank * self.input_size, self.input_size), b

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, part: int, name: str) -> None:
        if param.dim() == 1:  # bias: added once, after the reduce
            check_shape(name, loaded, param.shape)
            param.data.copy_(loaded)
        else:
            check_shape(name, loaded, (param.shape[0], self.input_size * _tp_size))
            if isinstance(loaded, QuantizedWeight) and self.input_size % BLOCK[loaded.qtype][0]:
                raise ValueError(
                    f"tensor_parallel_size ({_tp_size}) must split the {self.input_size * _tp_size} input columns of "
                    f"{name!r} into whole {loaded.qtype.name} blocks of {BLOCK[loaded.qtype][0]}, got "
                    f"{self.input_size} columns a rank")
            self.load_weight_rows(param, loaded.narrow(1, _tp_rank * self.input_size, self.input_size), 0, 0)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // _tp_size)
        self.start = _tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if _tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.shard_size)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(y.masked_fill(outside.unsqueeze(-1), 0))

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, part: int, name: str) -> None:
        check_shape(name, loaded, (self.vocab_size, param.shape[1]))
        rows = min(self.shard_size, self.vocab_size - self.start)
        if isinstance(loaded, QuantizedWeight):  # an embedding is a gather: its rows as floats
            copy_dequantized(param.data[:rows], loaded.narrow(0, self.start, rows))
        else:
            param.data[:rows].copy_(loaded.narrow(0, self.start, rows))


class ParallelLMHead(SmallBatchGemv, VocabParallelEmbedding):
    """Logits over the full vocabulary; each rank computes its vocabulary slice, then they are gathered.
    Given a QuantizedWeight, the head multiplies with its blocks; a tied head's weight stays the
    embedding's (`tied`), which the embedding fills with the blocks' values."""

    packed_weight: torch.Tensor | None = None
    qweight: QuantizedWeight | None = None
    tied = False
    upcast = False

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, part: int, name: str) -> None:
        if not isinstance(loaded, QuantizedWeight):
            return super().load_weight(param, loaded, part, name)
        check_shape(name, loaded, (self.vocab_size, param.shape[1]))
        self.qweight = loaded.narrow(0, self.start, min(self.shard_size, self.vocab_size - self.start)).to(param.device)
        if not self.tied:
            self.weight = empty_like_rows(param)

    def pack(self, gemv=None, gemv_max_rows: int = 0) -> bool:
        """Packs a copy: the weight itself may be the (tied) embedding table, which needs its rows
        (and which the GEMV of small batches reads). Where oneDNN cannot pack it, multiplies in
        float32."""
        if self.qweight is not None:
            return False
        self.packed_weight = pack_linear_weight(self.weight)
        self.upcast = self.packed_weight is None
        if gemv is not None:
            self.use_gemv(gemv, gemv_max_rows, self.weight.data)
        return self.packed_weight is not None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            logits = quantized_linear(hidden, self.qweight)
            if logits.shape[-1] < self.shard_size:  # the last shard's padding rows: zeros, cut below
                logits = F.pad(logits, (0, self.shard_size - logits.shape[-1]))
        elif hidden.shape[0] <= self.gemv_max_rows:
            logits = self.gemv(hidden, self.plain_weight)
        elif self.packed_weight is not None:
            logits = packed_linear(hidden, self.packed_weight)
        elif self.upcast:
            logits = upcast_linear(hidden, self.weight)
        else:
            logits = F.linear(hidden, self.weight)
        if _tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(_tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.vocab_size]
