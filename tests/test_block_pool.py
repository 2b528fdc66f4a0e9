import pytest

from conveyor.engine_core.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock


def ids(blocks):
    return [b.block_id for b in blocks]


def test_free_queue_pops_in_insertion_order():
    blocks = [KVCacheBlock(i) for i in range(4)]
    queue = FreeBlockQueue(blocks)
    assert ids([queue.popleft(), queue.popleft()]) == [0, 1]
    assert len(queue) == 2


def test_free_queue_removes_from_the_middle():
    blocks = [KVCacheBlock(i) for i in range(4)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert ids(queue.blocks()) == [0, 1, 3]
    assert len(queue) == 3
    assert blocks[2].prev_free is None and blocks[2].next_free is None


def test_free_queue_append_goes_to_tail_and_appendleft_to_head():
    blocks = [KVCacheBlock(i) for i in range(4)]
    queue = FreeBlockQueue(blocks[1:3])
    queue.append(blocks[3])
    queue.appendleft(blocks[0])
    assert ids(queue.blocks()) == [0, 1, 2, 3]


def test_free_queue_rejects_double_insert_and_missing_remove():
    block = KVCacheBlock(0)
    queue = FreeBlockQueue([block])
    with pytest.raises(ValueError):
        queue.append(block)
    queue.popleft()
    with pytest.raises(ValueError):
        queue.remove(block)
    with pytest.raises(ValueError):
        queue.popleft()


def test_get_new_blocks_takes_one_reference_each():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.75)


def test_get_new_blocks_beyond_free_raises():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="only 2 are free"):
        pool.get_new_blocks(3)


def test_get_new_blocks_evicts_cached_hash():
    pool = BlockPool(1)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([block], [123], 0, 1)
    pool.free_blocks([block])
    assert pool.get_cached_block(123) is block
    pool.get_new_blocks(1)
    assert pool.get_cached_block(123) is None
    assert block.block_hash is None


def test_touch_removes_free_cached_block_from_free_list():
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([block], [7], 0, 1)
    pool.free_blocks([block])
    pool.touch([block])
    assert block.ref_cnt == 1
    assert block not in pool.free_block_queue.blocks()
    assert pool.num_free_blocks == 2


def test_freeing_a_block_twice_raises():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(ValueError):
        pool.free_blocks([block])


def test_duplicate_hash_keeps_first_registered_block():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    pool.cache_full_blocks([a], [5], 0, 1)
    pool.cache_full_blocks([b], [5], 0, 1)
    assert pool.get_cached_block(5) is a
    assert b.block_hash is None


def test_caching_disabled_registers_nothing():
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([block], [5], 0, 1)
    assert pool.get_cached_block(5) is None
