"""Tensor-parallel layers: column/row-parallel linears, vocab-parallel embedding and LM head.

Each rank holds a slice of every weight; a rank's `load_weight` takes the full checkpoint tensor
and copies out its own shard, so checkpoints load unchanged at any tensor-parallel size.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_tp_rank = 0
_tp_size = 1


def init_tensor_parallel(rank: int, size: int) -> None:
    global _tp_rank, _tp_size
    _tp_rank, _tp_size = rank, size


def tp_rank() -> int:
    return _tp_rank


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


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output rows; `output_sizes` names the stacked parts
    (e.g. q, k, v), each sharded separately so every rank gets its slice of each."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.output_sizes = [divide(s, _tp_size, "linear output size") for s in output_sizes]
        self.weight = nn.Parameter(torch.empty(sum(self.output_sizes), input_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.output_sizes), dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, part: int, name: str) -> None:
        size = self.output_sizes[part]
        check_shape(name, loaded, (size * _tp_size, *param.shape[1:]))
        offset = sum(self.output_sizes[:part])
        shard = loaded.narrow(0, _tp_rank * size, size)
        param.data.narrow(0, offset, size).copy_(shard)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along its input columns; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.input_size = divide(input_size, _tp_size, "linear input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, part: int, name: str) -> None:
        if param.dim() == 1:  # bias: added once, after the reduce
            check_shape(name, loaded, param.shape)
            param.data.copy_(loaded)
        else:
            check_shape(name, loaded, (param.shape[0], self.input_size * _tp_size))
            param.data.copy_(loaded.narrow(1, _tp_rank * self.input_size, self.input_size))


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
        param.data[:rows].copy_(loaded.narrow(0, self.start, rows))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the full vocabulary; each rank computes its vocabulary slice, then they are gathered."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if _tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(_tp_size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.vocab_size]
