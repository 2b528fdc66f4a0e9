"""The draft-model proposer (`speculative_config={"method": "draft_model", "model": DIR, ...}`): a
smaller model with the target's vocabulary runs beside it in every worker and proposes k tokens a
step, greedily, one at a time.

Its paged KV cache is its own tensor but shares the target's block tables: block b of a request
holds the same positions in both caches, so the core's block accounting, rollback and prefix
cache serve both (a cached block was computed by both models). Every step the draft runs over the
target's whole batch first (the drafts the target verifies included, so its cache matches the
target's positions), then, for each request that sampled, decodes k tokens from the last one kept,
in the slots the core allocated past the step for it.

It is tensor-parallel like the target: the same layers, each rank its shard, the logits gathered,
so every rank proposes the same tokens without sending them to each other.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from conveyor.config import EngineConfig
from conveyor.gguf_metadata import hf_config_of, open_gguf
from conveyor.gpu_worker.attention import AttentionMetadata
from conveyor.gpu_worker.model_loader import load_model


class DraftModel:
    def __init__(self, config: EngineConfig, target_hf_config, dtype: torch.dtype, device: torch.device, ops):
        spec = config.speculative_config
        draft = EngineConfig(model=spec.model, dtype=config.dtype, tensor_parallel_size=config.tensor_parallel_size,
                             block_size=config.block_size)
        gguf = open_gguf(draft.gguf_path) if draft.gguf_file else None
        self.hf_config = hf_config_of(gguf) if gguf else draft.load_hf_config()
        if self.hf_config.vocab_size != target_hf_config.vocab_size:
            raise ValueError(f"speculative_config.model must have the target's vocabulary ({target_hf_config.vocab_size} "
                             f"tokens), got {self.hf_config.vocab_size} in {spec.model}")
        self.model = load_model(draft.model, self.hf_config, dtype, device, ops, gguf, draft.quantization)
        self.k = spec.num_speculative_tokens
        self.block_size = config.block_size
        self.dtype, self.device = dtype, device
        self.max_position = self.hf_config.max_position_embeddings
        self.kv_caches: list[torch.Tensor] = []

    def kv_block_bytes(self) -> int:
        attn = self.model.model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize
        return per_token * self.block_size * self.hf_config.num_hidden_layers

    def init_kv_cache(self, num_blocks: int) -> None:
        attn = self.model.model.layers[0].self_attn
        shape = (self.hf_config.num_hidden_layers, 2, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_caches = list(torch.zeros(shape, dtype=self.dtype, device=self.device).unbind(0))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """The target's step through the draft: its cache gets the same positions."""
        self.model(input_ids, positions, self.kv_caches, dataclasses.replace(meta, decode_plan=None))

    def propose(self, last_tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> list[list[int]]:
        """k greedy tokens after each `last_tokens[i]`, which sits at `positions[i]`; a sequence whose
        blocks (or the draft's positions) cannot hold k more positions gets none."""
        rows = [i for i, p in enumerate(positions)
                if p + self.k <= min(len(block_tables[i]) * self.block_size, self.max_position)]
        drafts: list[list[int]] = [[] for _ in positions]
        if not rows:
            return drafts
        bs, device = self.block_size, self.device
        tables = np.zeros((len(rows), max(len(block_tables[i]) for i in rows)), dtype=np.int32)
        for r, i in enumerate(rows):
            tables[r, :len(block_tables[i])] = block_tables[i]
        block_table_tensor = torch.from_numpy(tables).to(device)
        tokens = np.array([last_tokens[i] for i in rows], dtype=np.int64)
        pos = np.array([positions[i] for i in rows], dtype=np.int64)
        query_start_loc = torch.arange(len(rows) + 1, dtype=torch.int32, device=device)
        for _ in range(self.k):
            slots = tables[np.arange(len(rows)), pos // bs].astype(np.int64) * bs + pos % bs
            seq_lens = pos + 1
            meta = AttentionMetadata(
                slot_mapping=torch.from_numpy(slots).to(device),
                query_start_loc=query_start_loc,
                seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(device),
                block_tables=block_table_tensor,
                max_query_len=1,
                max_seq_len=int(seq_lens.max()),
                num_decodes=len(rows),
                query_lens_cpu=[1] * len(rows),
                seq_lens_cpu=seq_lens.tolist(),
            )
            hidden = self.model(torch.from_numpy(tokens).to(device), torch.from_numpy(pos).to(device),
                                self.kv_caches, meta)
            tokens = self.model.compute_logits(hidden).argmax(dim=-1).cpu().numpy()
            for r, i in enumerate(rows):
                drafts[i].append(int(tokens[r]))
            pos = pos + 1
        return drafts
