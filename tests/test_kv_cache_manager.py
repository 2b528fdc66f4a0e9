import random

import pytest

from conveyor.engine_core.kv_cache_manager import KVCacheManager, prompt_block_hashes, update_block_hashes
from conveyor.engine_core.request import Request
from conveyor.sampling_params import SamplingParams

BS = 4


def make_request(rid, tokens, **kwargs) -> Request:
    return Request(rid, list(tokens), SamplingParams(**kwargs.pop("sp", {})), **kwargs)


def prefill(mgr: KVCacheManager, req: Request) -> tuple[list[int] | None, int]:
    """Schedule the whole prompt in one step, as the scheduler would, and mark it computed."""
    hits, num_hit = mgr.get_computed_blocks(req)
    new_ids = mgr.allocate_slots(req, req.num_tokens - num_hit, hits, num_hit)
    if new_ids is not None:
        req.num_computed_tokens = req.num_tokens
    return new_ids, num_hit


def decode(mgr: KVCacheManager, req: Request, token: int = 0) -> list[int] | None:
    """One decode step: the token sampled last step is computed, a new one sampled."""
    if req.num_computed_tokens == req.num_tokens:
        req.append_output_token_ids([token])
    new_ids = mgr.allocate_slots(req, 1)
    if new_ids is not None:
        req.num_computed_tokens += 1
    return new_ids


def test_allocate_gives_blocks_for_all_tokens_with_one_reference_each():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", range(10))
    new_ids, _ = prefill(mgr, req)
    assert len(new_ids) == 3
    assert mgr.get_block_ids("a") == new_ids
    assert [mgr.block_pool.blocks[i].ref_cnt for i in new_ids] == [1, 1, 1]
    assert mgr.num_free_blocks == 5


def test_free_drops_references_and_forgets_request():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", range(10))
    new_ids, _ = prefill(mgr, req)
    mgr.free(req)
    assert [mgr.block_pool.blocks[i].ref_cnt for i in new_ids] == [0, 0, 0]
    assert mgr.get_block_ids("a") == []
    assert mgr.num_free_blocks == 8


def test_running_out_of_blocks_returns_none_and_changes_nothing():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(12))
    prefill(mgr, a)
    b = make_request("b", range(100, 108))
    assert mgr.allocate_slots(b, 8) is None
    assert mgr.num_free_blocks == 1
    assert mgr.get_block_ids("b") == []
    assert mgr.allocate_slots(b, 4) is not None


def test_free_cached_hits_count_against_free_blocks_when_allocating():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(9))  # 2 full blocks cached, 3 blocks total
    prefill(mgr, a)
    mgr.free(a)
    b = make_request("b", list(range(8)) + list(range(50, 62)))  # hits 2 blocks, needs 3 more
    hits, num_hit = mgr.get_computed_blocks(b)
    assert num_hit == 8
    assert mgr.allocate_slots(b, b.num_tokens - num_hit, hits, num_hit) is None
    assert [blk.ref_cnt for blk in hits] == [0, 0]
    assert mgr.num_free_blocks == 4


def test_lru_evicts_least_recently_freed_request_first():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    a, b = make_request("a", range(0, 9)), make_request("b", range(20, 29))
    prefill(mgr, a)
    mgr.free(a)
    prefill(mgr, b)
    mgr.free(b)
    a_ids, b_ids = [a.block_hashes[i] for i in range(2)], [b.block_hashes[i] for i in range(2)]
    prefill(mgr, make_request("c", range(40, 48)))  # needs 2 blocks
    pool = mgr.block_pool
    assert [pool.get_cached_block(h) for h in a_ids].count(None) == 2
    assert [pool.get_cached_block(h) for h in b_ids].count(None) == 0


def test_request_tail_blocks_are_evicted_before_its_head():
    mgr = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", range(12))
    prefill(mgr, a)
    mgr.free(a)
    prefill(mgr, make_request("b", range(50, 54)))  # one block: evicts a's last
    pool = mgr.block_pool
    assert pool.get_cached_block(a.block_hashes[0]) is not None
    assert pool.get_cached_block(a.block_hashes[1]) is not None
    assert pool.get_cached_block(a.block_hashes[2]) is None


def test_uncached_free_blocks_are_reused_before_cached_ones_are_evicted():
    mgr = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", range(6))  # one full cached block + one partial block
    prefill(mgr, a)
    partial_id = mgr.get_block_ids("a")[1]
    mgr.free(a)
    new_ids, _ = prefill(mgr, make_request("b", range(50, 54)))
    assert new_ids == [partial_id]
    assert mgr.block_pool.get_cached_block(a.block_hashes[0]) is not None


def test_prefix_hit_reuses_block_ids_and_reports_cached_tokens():
    mgr = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", range(10))
    prefill(mgr, a)
    b = make_request("b", list(range(10)) + [77, 78])
    hits, num_hit = mgr.get_computed_blocks(b)
    assert num_hit == 8
    new_ids = mgr.allocate_slots(b, b.num_tokens - num_hit, hits, num_hit)
    assert new_ids[:2] == mgr.get_block_ids("a")[:2]
    assert len(new_ids) == 3
    assert [blk.ref_cnt for blk in hits] == [2, 2]


def test_full_prompt_hit_still_leaves_one_token_to_compute():
    mgr = KVCacheManager(num_blocks=16, block_size=BS)
    prefill(mgr, make_request("a", range(8)))
    b = make_request("b", range(8))
    hits, num_hit = mgr.get_computed_blocks(b)
    assert num_hit == 4
    assert len(hits) == 1


def test_prompt_one_past_cached_blocks_hits_all_of_them():
    mgr = KVCacheManager(num_blocks=16, block_size=BS)
    prefill(mgr, make_request("a", range(8)))
    _, num_hit = mgr.get_computed_blocks(make_request("b", list(range(8)) + [9]))
    assert num_hit == 8


@pytest.mark.parametrize(
    "first, second",
    [({"lora_id": 0}, {"lora_id": 1}), ({"cache_salt": None}, {"cache_salt": "tenant-b"})],
)
def test_different_extra_keys_do_not_hit(first, second):
    mgr = KVCacheManager(num_blocks=16, block_size=BS)
    prefill(mgr, make_request("a", range(9), **first))
    _, num_hit = mgr.get_computed_blocks(make_request("b", range(9), **second))
    assert num_hit == 0


def test_same_extra_keys_hit():
    mgr = KVCacheManager(num_blocks=16, block_size=BS)
    prefill(mgr, make_request("a", range(9), lora_id=3, cache_salt="s"))
    _, num_hit = mgr.get_computed_blocks(make_request("b", range(9), lora_id=3, cache_salt="s"))
    assert num_hit == 8


def test_same_block_after_different_prefix_does_not_hit():
    mgr = KVCacheManager(num_blocks=16, block_size=BS)
    prefill(mgr, make_request("a", [1, 1, 1, 1, 5, 6, 7, 8, 0]))
    b = make_request("b", [2, 2, 2, 2, 5, 6, 7, 8, 0])
    _, num_hit = mgr.get_computed_blocks(b)
    assert num_hit == 0
    a_hashes = update_block_hashes(make_request("x", [1, 1, 1, 1, 5, 6, 7, 8]), BS)
    assert a_hashes[1] != b.block_hashes[1]


def test_block_hashes_grow_only_by_new_full_blocks():
    req = make_request("a", range(6))
    hashes = update_block_hashes(req, BS)
    first = hashes[0]
    assert len(hashes) == 1
    req.append_output_token_ids([6, 7, 8])
    update_block_hashes(req, BS)
    assert req.block_hashes[0] == first
    assert req.block_hashes == update_block_hashes(make_request("b", range(9)), BS)


@pytest.mark.parametrize("extra", [{}, {"lora_id": 2, "cache_salt": "tenant"}])
def test_prompt_hashes_computed_ahead_match_and_hit_like_the_schedulers_own(extra):
    # The core's input thread hashes a new request's prompt before the busy loop adds it.
    ahead = prompt_block_hashes(list(range(11)), BS, extra.get("lora_id", 0), extra.get("cache_salt"))
    assert ahead == update_block_hashes(make_request("x", range(11), **extra), BS) and len(ahead) == 2
    mgr = KVCacheManager(num_blocks=16, block_size=BS)
    prefill(mgr, make_request("a", range(11), **extra))
    req = make_request("b", range(11), block_hashes=list(ahead), **extra)
    _, num_hit = mgr.get_computed_blocks(req)
    assert num_hit == 8
    req.append_output_token_ids([11, 12])  # and they chain on as outputs fill blocks
    assert update_block_hashes(req, BS) == update_block_hashes(make_request("c", range(13), **extra), BS)


def test_cached_free_block_touched_by_new_request_is_not_evicted_while_in_use():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(5))
    prefill(mgr, a)
    mgr.free(a)
    b = make_request("b", list(range(4)) + [9])
    hits, num_hit = mgr.get_computed_blocks(b)
    mgr.allocate_slots(b, b.num_tokens - num_hit, hits, num_hit)
    assert hits[0] not in mgr.block_pool.free_block_queue.blocks()
    assert mgr.num_free_blocks == 2
    prefill(mgr, make_request("c", range(100, 108)))  # takes every free block
    assert mgr.block_pool.get_cached_block(a.block_hashes[0]) is hits[0]
    assert mgr.allocate_slots(make_request("d", range(4)), 4) is None


def test_reset_prefix_cache_refused_while_blocks_in_use():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(5))
    prefill(mgr, a)
    assert mgr.reset_prefix_cache() is False
    assert mgr.block_pool.get_cached_block(a.block_hashes[0]) is not None


def test_reset_prefix_cache_drops_every_hit():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(5))
    prefill(mgr, a)
    mgr.free(a)
    assert mgr.reset_prefix_cache() is True
    assert mgr.get_computed_blocks(make_request("b", range(5)))[1] == 0
    assert mgr.make_prefix_cache_stats().reset is True


def test_usage_returns_to_zero_after_freeing_everything():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    reqs = [make_request(str(i), range(i * 10, i * 10 + 7)) for i in range(3)]
    for req in reqs:
        prefill(mgr, req)
    assert mgr.usage == pytest.approx(6 / 8)
    for req in reqs:
        mgr.free(req)
    assert mgr.usage == 0.0


def test_decode_allocates_new_block_exactly_at_block_boundaries():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", range(3))
    prefill(mgr, req)
    grew = []
    for step in range(9):
        new_ids = decode(mgr, req, token=step)
        if new_ids:
            grew.append(req.num_computed_tokens)
    assert grew == [5, 9]  # the 5th and 9th tokens open blocks 2 and 3
    assert len(mgr.get_block_ids("a")) == 3


def test_decode_caches_blocks_as_they_fill():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", range(3))
    prefill(mgr, req)
    for step in range(3):
        decode(mgr, req, token=step)
    _, num_hit = mgr.get_computed_blocks(make_request("b", [0, 1, 2, 0, 1, 2]))
    assert num_hit == 4


def test_lookahead_slots_are_allocated_but_not_cached():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", range(4))
    new_ids = mgr.allocate_slots(req, 4, num_lookahead_tokens=5)
    assert len(new_ids) == 3
    assert mgr.block_pool.blocks[new_ids[1]].block_hash is None


def test_trim_frees_blocks_past_the_kept_tokens():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", range(4))
    mgr.allocate_slots(req, 4, num_lookahead_tokens=6)
    req.num_computed_tokens = 4
    mgr.trim(req, 5)
    assert len(mgr.get_block_ids("a")) == 2
    assert mgr.num_free_blocks == 6


def test_trim_refuses_to_cut_into_a_cached_block():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", range(8))
    prefill(mgr, req)
    with pytest.raises(ValueError, match="prefix cache"):
        mgr.trim(req, 6)


def test_caching_disabled_never_hits():
    mgr = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prefill(mgr, make_request("a", range(9)))
    assert mgr.get_computed_blocks(make_request("b", range(9))) == ([], 0)


def test_prompt_logprobs_request_skips_the_cache():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    prefill(mgr, make_request("a", range(9)))
    req = make_request("b", range(9), sp={"prompt_logprobs": 1})
    assert mgr.get_computed_blocks(req)[1] == 0


def test_prefix_cache_stats_count_tokens_and_restart_after_read():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    prefill(mgr, make_request("a", range(9)))
    prefill(mgr, make_request("b", range(10)))
    stats = mgr.make_prefix_cache_stats()
    assert (stats.requests, stats.queries, stats.hits) == (2, 19, 8)
    assert mgr.make_prefix_cache_stats().requests == 0


def test_can_fit_compares_with_the_whole_cache():
    mgr = KVCacheManager(num_blocks=4, block_size=BS)
    assert mgr.can_fit(16)
    assert not mgr.can_fit(17)


def test_stale_hit_is_reported_instead_of_reading_evicted_blocks():
    mgr = KVCacheManager(num_blocks=2, block_size=BS)
    a = make_request("a", range(5))
    prefill(mgr, a)
    mgr.free(a)
    b = make_request("b", range(5))
    hits, num_hit = mgr.get_computed_blocks(b)
    prefill(mgr, make_request("c", range(50, 58)))  # evicts the hit
    with pytest.raises(RuntimeError, match="evicted"):
        mgr.allocate_slots(b, 1, hits, num_hit)


def check_invariants(mgr: KVCacheManager, live: dict[str, Request]) -> None:
    pool = mgr.block_pool
    owners = [0] * pool.num_blocks
    assert set(mgr.req_to_blocks) <= set(live)
    for rid, blocks in mgr.req_to_blocks.items():
        block_ids = [b.block_id for b in blocks]
        assert len(set(block_ids)) == len(block_ids), f"{rid} owns a block twice"
        for block_id in block_ids:
            owners[block_id] += 1
    free = pool.free_block_queue.blocks()
    assert len(free) == pool.num_free_blocks
    assert {b.block_id for b in free} == {i for i, n in enumerate(owners) if n == 0}
    assert all(b.ref_cnt == owners[b.block_id] for b in pool.blocks)
    assert pool.num_free_blocks + sum(1 for n in owners if n) == pool.num_blocks
    for block_hash, block in pool.cached_block_hash_to_block.items():
        assert block.block_hash == block_hash
    assert sum(1 for b in pool.blocks if b.block_hash is not None) == len(
        pool.cached_block_hash_to_block
    )


def test_random_schedules_keep_block_invariants_and_hits_correct():
    rng = random.Random(1234)
    mgr = KVCacheManager(num_blocks=24, block_size=BS)
    # Fake KV: what each slot holds, as (extra keys, whole token prefix up to that slot).
    kv: dict[int, tuple] = {}
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(4, 14))] for _ in range(4)]
    live: dict[str, Request] = {}
    next_id = 0

    def write(req: Request, start: int, end: int) -> None:
        blocks = mgr.req_to_blocks[req.request_id]
        for pos in range(start, min(end, req.num_tokens)):
            block = blocks[pos // BS]
            assert block.ref_cnt == 1, "wrote into a shared block"
            extra = (req.lora_id, req.cache_salt)
            kv[block.block_id * BS + pos % BS] = (extra, tuple(req.all_token_ids[: pos + 1]))

    def step(req: Request, chunk: int, lookahead: int) -> bool:
        new_ids = mgr.allocate_slots(req, chunk, num_lookahead_tokens=lookahead)
        if new_ids is None:
            return False
        write(req, req.num_computed_tokens, req.num_computed_tokens + chunk)
        req.num_computed_tokens += chunk
        if lookahead and rng.random() < 0.5:
            mgr.trim(req, req.num_computed_tokens)
        return True

    for _ in range(3000):
        op = rng.random()
        if op < 0.3 and len(live) < 6:
            tokens = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randrange(0, 8))]
            lora_id, cache_salt = rng.choice([0, 0, 1]), rng.choice([None, "s"])
            req = make_request(f"r{next_id}", tokens, lora_id=lora_id, cache_salt=cache_salt)
            next_id += 1
            hits, num_hit = mgr.get_computed_blocks(req)
            assert num_hit < req.num_tokens
            for j, block in enumerate(hits):
                for off in range(BS):
                    prefix = tuple(req.all_token_ids[: j * BS + off + 1])
                    assert kv[block.block_id * BS + off] == ((lora_id, cache_salt), prefix)
            chunk = rng.randrange(1, req.num_tokens - num_hit + 1)
            if mgr.allocate_slots(req, chunk, hits, num_hit) is not None:
                req.num_computed_tokens = num_hit
                write(req, num_hit, num_hit + chunk)
                req.num_computed_tokens += chunk
                live[req.request_id] = req
        elif op < 0.85 and live:
            req = live[rng.choice(list(live))]
            if req.num_computed_tokens < req.num_tokens:
                ok = step(req, rng.randrange(1, req.num_tokens - req.num_computed_tokens + 1), 0)
            else:
                req.append_output_token_ids([rng.randrange(3)])
                ok = step(req, 1, rng.choice([0, 0, 2]))
            if not ok or req.num_tokens > 40:  # preempted, or finished
                mgr.free(req)
                del live[req.request_id]
        elif op < 0.99 and live:
            mgr.free(live.pop(rng.choice(list(live))))
        else:
            assert mgr.reset_prefix_cache() is (not live)
        check_invariants(mgr, live)

    for req in live.values():
        mgr.free(req)
    check_invariants(mgr, {})
    assert mgr.usage == 0.0
    assert mgr.make_prefix_cache_stats().hits > 0


def test_draft_tokens_scheduled_past_known_tokens_are_not_cached():
    mgr = KVCacheManager(num_blocks=8, block_size=BS)
    req = make_request("a", range(4))
    prefill(mgr, req)
    req.append_output_token_ids([9])
    new_ids = mgr.allocate_slots(req, 1 + 4)  # the sampled token plus 4 drafts
    assert len(new_ids) == 2
    assert all(mgr.block_pool.blocks[i].block_hash is None for i in new_ids)
