"""LoRA adapters inside the batched forward.

Every linear layer multiplies the whole batch by its base weight once; then, for each adapter of
the step, the rows of that adapter's tokens get x A^T B^T (scaling folded into B) added: one
shrink for all the parts of a stacked layer (q, k, v or gate, up), one expand per part, in float32
(the ops' `lora_shrink` / `lora_expand`: torch, or on CUDA Triton kernels that gather and scatter
the rows themselves). A step's tokens are grouped by adapter once (`LoRABatch.prepare`) and every
layer reuses the groups.

Tensor parallelism shards an adapter as its layer: a column-parallel layer's B by output rows (each
part's slice), a row-parallel layer's A by input columns, whose partial x A^T B^T then joins the
layer's own partial sums in its all-reduce.
"""

import torch

from conveyor.gpu_worker.models.llama import STACKED_PARAMS
from conveyor.gpu_worker.parallel import ColumnParallelLinear, LinearBase, RowParallelLinear
from conveyor.lora import read_adapter


class LoRABatch:
    """This step's tokens by adapter: (adapter id, row indices, or None for every row)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.groups: list[tuple[int, torch.Tensor | None]] = []

    def prepare(self, lora_ids: list[int], num_tokens: list[int]) -> None:
        """Requests in the step's order, each with its adapter (0: none) and its number of tokens."""
        self.groups = []
        if not any(lora_ids):
            return
        if all(i == lora_ids[0] for i in lora_ids):
            self.groups = [(lora_ids[0], None)]
            return
        rows: dict[int, list[int]] = {}
        start = 0
        for lora_id, n in zip(lora_ids, num_tokens):
            if lora_id:
                rows.setdefault(lora_id, []).extend(range(start, start + n))
            start += n
        self.groups = [(lora_id, torch.tensor(r, device=self.device)) for lora_id, r in rows.items()]


class LayerAdapter:
    """One adapter's weights in one layer: A of every adapted part stacked, and each part's B."""

    __slots__ = ("a", "parts")

    def __init__(self, a: torch.Tensor, parts: list[tuple[int, int, torch.Tensor]]):
        self.a = a  # [sum of ranks, input]
        self.parts = parts  # (output offset, first row of its A in `a`, B [output size, rank])


class LoRALayer:
    def __init__(self, batch: LoRABatch, output_sizes: list[int], ops):
        self.batch = batch
        self.ops = ops  # lora_shrink / lora_expand: torch, or Triton kernels on CUDA
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.adapters: dict[int, LayerAdapter] = {}

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += the adapted rows' low-rank updates, in place."""
        for lora_id, rows in self.batch.groups:
            adapter = self.adapters.get(lora_id)
            if adapter is None:
                continue
            shrunk = self.ops.lora_shrink(x, rows, adapter.a)
            for offset, a_start, b in adapter.parts:
                self.ops.lora_expand(shrunk[:, a_start:a_start + b.shape[1]], rows, b, y, offset)

    def add(self, lora_id: int, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """parts: part index -> (A shard, scaled B shard)."""
        a_rows, layout, start = [], [], 0
        for part, (a, b) in sorted(parts.items()):
            a_rows.append(a)
            layout.append((self.offsets[part], start, b))
            start += a.shape[0]
        self.adapters[lora_id] = LayerAdapter(torch.cat(a_rows).contiguous(), layout)


class LoRAManager:
    """The adapters this rank holds, loaded and dropped as the core's steps say."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, device: torch.device, ops):
        self.dtype, self.device = dtype, device
        self.batch = LoRABatch(device)
        self.layers: dict[str, LinearBase] = {}
        for name, module in model.named_modules():
            if isinstance(module, ColumnParallelLinear):
                module.lora = LoRALayer(self.batch, module.output_sizes, ops)
            elif isinstance(module, RowParallelLinear):
                module.lora = LoRALayer(self.batch, [module.output_size], ops)
            else:
                continue
            self.layers[name] = module
        self.failed: dict[int, str] = {}  # adapters that did not load: their requests fail

    def load(self, lora_id: int, path: str) -> None:
        try:
            config, modules = read_adapter(path)
            per_layer: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
            for module_name, pair in modules.items():
                layer_name, part = module_name, 0
                for fragment, (stacked, index) in STACKED_PARAMS.items():
                    if module_name.endswith(f".{fragment}"):
                        layer_name, part = module_name.removesuffix(fragment) + stacked, index
                layer = self.layers[layer_name]
                a, b = layer.lora_shard(pair["A"], pair["B"] * config.scaling, part)
                per_layer.setdefault(layer_name, {})[part] = (
                    a.to(self.device, self.dtype), b.to(self.device, self.dtype).contiguous())
        except Exception as exc:  # checked by the frontend: a file changed or vanished since
            self.failed[lora_id] = f"LoRA adapter {lora_id} ({path}) failed to load: {type(exc).__name__}: {exc}"
            return
        for layer_name, parts in per_layer.items():
            self.layers[layer_name].lora.add(lora_id, parts)

    def evict(self, lora_id: int) -> None:
        self.failed.pop(lora_id, None)
        for layer in self.layers.values():
            layer.lora.adapters.pop(lora_id, None)
