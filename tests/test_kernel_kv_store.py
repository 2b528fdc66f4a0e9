"""store_kv against store_kv_ref (Triton interpreter): copies are bit-exact, nothing else changes."""

import pytest
import torch

from conveyor.kernels.kv_store import store_kv, store_kv_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare raw bits, so NaN slots and bf16 values must match exactly."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def random_cache(shape, dtype, gen):
    cache = torch.randn(shape, generator=gen).to(dtype)
    cache[0, 0] = float("nan")  # a NaN already in the cache must stay untouched
    return cache


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(16, 2, 64), (32, 1, 80), (16, 3, 128)])
def test_store_kv_writes_each_token_to_its_slot_and_skips_padding(dtype, block_size, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    num_blocks = 4
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = random_cache(shape, dtype, gen), random_cache(shape, dtype, gen)
    # slots in several blocks, a block boundary, the very last slot, and padding (-1) in between
    slots = torch.tensor([block_size - 1, -1, block_size, 3, num_blocks * block_size - 1, -1, 2 * block_size + 5])
    key = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen).to(dtype)

    k_out, v_out = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_out, v_out, slots)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_ref, v_ref, slots)

    assert torch.equal(bits(k_out), bits(k_ref)) and torch.equal(bits(v_out), bits(v_ref))
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    untouched = ~written.view(num_blocks, block_size)
    assert torch.equal(bits(k_out[untouched]), bits(k_cache[untouched]))
    assert torch.equal(bits(k_out[0, block_size - 1]), bits(key[0]))


def test_store_kv_accepts_key_and_value_sliced_from_a_fused_qkv():
    num_heads, num_kv_heads, head_dim, tokens = 4, 2, 64, 5
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    key = qkv[:, q_size:q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    value = qkv[:, q_size + kv_size:].view(tokens, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    k_cache, v_cache = torch.zeros(2, 16, num_kv_heads, head_dim), torch.zeros(2, 16, num_kv_heads, head_dim)
    slots = torch.tensor([7, 8, 9, 16, -1])
    store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[slots[:4]], key[:4])
    assert torch.equal(v_cache.view(-1, num_kv_heads, head_dim)[slots[:4]], value[:4])


def test_all_padding_leaves_the_cache_untouched():
    k_cache = torch.randn(2, 16, 1, 64)
    before = k_cache.clone()
    store_kv(torch.randn(3, 1, 64), torch.randn(3, 1, 64), k_cache, k_cache, torch.full((3,), -1))
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("name,bad,message", [
    ("slot_mapping", lambda t: t.int(), "slot_mapping must have dtype torch.int64"),
    ("key", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), "key must be contiguous in its last dimension"),
    ("value", lambda t: t.half(), "value must have dtype torch.float32"),
    ("k_cache", lambda t: t[:, :, :, :32], r"k_cache must have shape \[\*, \*, 2, 64\]"),
    ("v_cache", lambda t: t[:1], "v_cache must have shape"),
])
def test_bad_layout_raises_value_error_naming_the_argument(name, bad, message):
    inputs = dict(key=torch.randn(3, 2, 64), value=torch.randn(3, 2, 64), k_cache=torch.zeros(2, 16, 2, 64),
                  v_cache=torch.zeros(2, 16, 2, 64), slot_mapping=torch.tensor([0, 1, 2]))
    inputs[name] = bad(inputs[name])
    with pytest.raises(ValueError, match=message):
        store_kv(**inputs)
