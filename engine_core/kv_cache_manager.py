"""Which KV-cache blocks each request owns, and the prefix cache that lets requests share them.

Block hashes: block i of a request hashes (hash of block i-1, its `block_size` token ids); block
0 chains from a root hash of the request's extra keys (`lora_id`, `cache_salt`, and a digest of
its prompt-tuning table, whose rows its virtual token ids stand for), so every block of a request
carries them. The hash is SHA-256, as an int: collision-resistant (one tenant cannot
craft a prompt that reads another's KV) and equal across processes and machines (blocks can be
matched between engines). It costs about 1 µs per full block, computed once per block,
incrementally; a new request's prompt blocks are hashed in the core's input thread as it arrives.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

from conveyor.engine_core.block_pool import BlockPool, KVCacheBlock

if TYPE_CHECKING:
    from conveyor.engine_core.request import Request
    from conveyor.ipc.messages import EmbeddingTable


def root_block_hash(lora_id: int, cache_salt: str | None, table: EmbeddingTable | None = None) -> int:
    salt = b"\x00" if cache_salt is None else b"\x01" + cache_salt.encode()
    data = b"conveyor-kv/1" + lora_id.to_bytes(8, "little", signed=True) + salt
    if table is not None:
        header = f"{table.dtype}{table.shape}".encode()
        data += b"\x02" + hashlib.sha256(header + table.data).digest()
    return int.from_bytes(hashlib.sha256(data).digest(), "little")


def update_block_hashes(request: Request, block_size: int) -> list[int]:
    """Extend `request.block_hashes` to cover every full block of its tokens; O(new tokens)."""
    hashes = request.block_hashes
    if len(hashes) < len(request.all_token_ids) // block_size:
        root = None if hashes else root_block_hash(request.lora_id, request.cache_salt, request.prompt_embedding_table)
        extend_block_hashes(hashes, root, request.all_token_ids, block_size)
    return hashes


def prompt_block_hashes(token_ids: list[int], block_size: int, lora_id: int, cache_salt: str | None,
                        table: EmbeddingTable | None = None) -> list[int]:
    """The hashes of a new request's full prompt blocks: what `update_block_hashes` computes first
    for it, computed beforehand (the core's input thread does, off the scheduling path)."""
    return extend_block_hashes([], root_block_hash(lora_id, cache_salt, table), token_ids, block_size)


def extend_block_hashes(hashes: list[int], root: int | None, token_ids: list[int], block_size: int) -> list[int]:
    """Append the hashes of the full blocks of `token_ids` past those in `hashes`, chaining from
    the last of them (or from `root` if there is none)."""
    done, num_full = len(hashes), len(token_ids) // block_size
    parent = (hashes[-1] if hashes else root).to_bytes(32, "little")
    data = array("q", token_ids[done * block_size : num_full * block_size]).tobytes()
    size, sha256 = 8 * block_size, hashlib.sha256
    for start in range(0, len(data), size):  # SHA-256(parent's 32 bytes + the block's ids as int64)
        parent = sha256(parent + data[start : start + size]).digest()
        hashes.append(int.from_bytes(parent, "little"))
    return hashes


@dataclass(slots=True)
class PrefixCacheStats:
    reset: bool = False  # the cache was reset since the previous stats
    requests: int = 0  # lookups (get_computed_blocks calls)
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens served from the cache


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def can_fit(self, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens fit the whole cache, with nothing else in it."""
        return -(-num_tokens // self.block_size) <= self.block_pool.num_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of the request's full blocks, and its length in tokens. At
        least one token is left to compute, so that the step samples the next one. Call
        `allocate_slots` with the result before allocating for any other request: until then
        the hit blocks may be evicted."""
        if not self.enable_prefix_caching:
            return [], 0
        block_hashes = update_block_hashes(request, self.block_size)
        stats = self.prefix_cache_stats
        stats.requests += 1
        stats.queries += request.num_tokens
        if getattr(request.sampling_params, "prompt_logprobs", None) is not None:
            return [], 0  # every prompt token must go through the model
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        get_cached_block = self.block_pool.get_cached_block
        computed = []
        for block_hash in islice(block_hashes, max_hit_blocks):
            block = get_cached_block(block_hash)
            if block is None:
                break
            computed.append(block)
        num_computed_tokens = len(computed) * self.block_size
        stats.hits += num_computed_tokens
        return computed, num_computed_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
        num_new_computed_tokens: int = 0,
        num_lookahead_tokens: int = 0,
    ) -> list[int] | None:
        """Give the request blocks for its computed tokens, `new_computed_blocks` (prefix-cache
        hits from `get_computed_blocks`), `num_new_tokens` to compute this step and
        `num_lookahead_tokens` draft slots. Returns the ids of the blocks added (hits first), or
        None, changing nothing, when too few blocks are free."""
        block_size = self.block_size
        hits = new_computed_blocks or []
        if num_new_tokens < 0 or num_lookahead_tokens < 0:
            raise ValueError(
                f"token counts must be >= 0, got num_new_tokens={num_new_tokens}, "
                f"num_lookahead_tokens={num_lookahead_tokens}"
            )
        if num_new_computed_tokens != len(hits) * block_size:
            raise ValueError(
                f"num_new_computed_tokens must be len(new_computed_blocks) * block_size = "
                f"{len(hits) * block_size}, got {num_new_computed_tokens}"
            )
        blocks = self.req_to_blocks.get(request.request_id)
        num_owned = 0 if blocks is None else len(blocks)
        num_computed = request.num_computed_tokens + num_new_computed_tokens
        num_required = -(-(num_computed + num_new_tokens + num_lookahead_tokens) // block_size)
        num_fresh = max(0, num_required - num_owned - len(hits))
        if hits:
            self._check_hits(request, hits, num_owned)
        if num_fresh:
            num_free_hits = sum(1 for block in hits if block.ref_cnt == 0)  # touched, they stop being free
            if num_fresh > self.block_pool.num_free_blocks - num_free_hits:
                return None

        if blocks is None:
            blocks = self.req_to_blocks[request.request_id] = []
        if hits:
            self.block_pool.touch(hits)
            blocks.extend(hits)
        fresh = self.block_pool.get_new_blocks(num_fresh) if num_fresh else []
        blocks.extend(fresh)

        if self.enable_prefix_caching:
            self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        if not (hits or fresh):
            return []  # the common decode step, whose tokens fit in the blocks it owns
        return [block.block_id for block in hits + fresh]

    def _check_hits(self, request: Request, hits: list[KVCacheBlock], num_owned: int) -> None:
        if num_owned * self.block_size != request.num_computed_tokens:
            raise ValueError("prefix-cache hits must directly follow the request's computed blocks")
        block_hashes = request.block_hashes
        for i, block in enumerate(hits, start=num_owned):
            if block.block_hash is None or block.block_hash != block_hashes[i]:
                raise RuntimeError(
                    f"prefix-cache hit for request {request.request_id} was evicted before "
                    "allocate_slots; call allocate_slots right after get_computed_blocks"
                )

    def _cache_full_blocks(
        self, request: Request, blocks: list[KVCacheBlock], num_tokens: int
    ) -> None:
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        num_cached = self.num_cached_blocks.get(request.request_id, 0)
        if num_full <= num_cached:
            return
        block_hashes = update_block_hashes(request, self.block_size)
        self.block_pool.cache_full_blocks(blocks, block_hashes, num_cached, num_full)
        self.num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first (so its tail is evicted first)."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def trim(self, request: Request, num_tokens: int) -> int:
        """Roll the request back to its first `num_tokens` KV slots (rejected draft tokens):
        blocks past them are freed; returns how many blocks it keeps. The cut may not fall inside a
        block already registered in the prefix cache (those hold verified tokens only, so a draft
        rollback never does)."""
        blocks = self.req_to_blocks.get(request.request_id)
        if blocks is None:
            return 0
        num_cached = self.num_cached_blocks.get(request.request_id, 0)
        if num_tokens < num_cached * self.block_size:
            raise ValueError(
                f"cannot trim request {request.request_id} to {num_tokens} tokens: its first "
                f"{num_cached * self.block_size} tokens are in the prefix cache"
            )
        num_keep = -(-num_tokens // self.block_size)
        if num_keep < len(blocks):
            self.block_pool.free_blocks(reversed(blocks[num_keep:]))
            del blocks[num_keep:]
        del request.block_hashes[num_tokens // self.block_size :]
        return len(blocks)

    def reset_prefix_cache(self) -> bool:
        """Forget all cached blocks; refused (False) while any request holds blocks."""
        if not self.block_pool.reset_prefix_cache():
            return False
        self.prefix_cache_stats.reset = True
        return True

    def make_prefix_cache_stats(self) -> PrefixCacheStats:
        """The stats gathered since the previous call; counting starts afresh."""
        stats, self.prefix_cache_stats = self.prefix_cache_stats, PrefixCacheStats()
        return stats
