"""rotary_embedding against rotary_embedding_ref, and the reference against Hugging Face Llama's RoPE."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from conveyor.kernels.rotary import compute_cos_sin_cache, rotary_embedding, rotary_embedding_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = lambda d: str(d).removeprefix("torch.")  # noqa: E731
# fp16 rounds exactly as torch does under the interpreter; it truncates bf16 casts.
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (0, 0), torch.bfloat16: (3e-2, 2e-2)}


def inv_freq(rot_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)


def qk(tokens, num_heads, num_kv_heads, head_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(tokens, num_heads * head_size, generator=gen).to(dtype)
    key = torch.randn(tokens, num_kv_heads * head_size, generator=gen).to(dtype)
    return query, key


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_is_hugging_face_llama_rope_bit_for_bit(dtype):
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 16})
    hf_rope = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 3, 17, 63])
    query, key = qk(4, 4, 2, 64, dtype)
    cos, sin = hf_rope(query, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(query.view(1, 4, 4, 64), key.view(1, 4, 2, 64), cos, sin, unsqueeze_dim=2)

    cache = compute_cos_sin_cache(hf_rope.inv_freq, 64, hf_rope.attention_scaling)
    rotary_embedding_ref(positions, query, key, cache, 64, is_neox=True)
    assert torch.equal(query, hf_q.view(4, 256)) and torch.equal(key, hf_k.view(4, 128))


def test_gpt_j_layout_rotates_interleaved_pairs():
    cache = compute_cos_sin_cache(inv_freq(4), 8)
    query = torch.arange(1.0, 9.0).view(1, 8)  # two heads of size 4
    key = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    angle = 5 * inv_freq(4)  # pairs (0, 1) and (2, 3) turn by angle[0] and angle[1]
    rotary_embedding_ref(torch.tensor([5]), query, key, cache, 4, is_neox=False)
    c, s = angle.cos(), angle.sin()
    torch.testing.assert_close(key[0], torch.stack([c[0], s[0], -s[1], c[1]]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_size,rot_dim,num_heads,num_kv_heads", [(64, 64, 4, 2), (80, 80, 3, 1), (128, 64, 2, 2)])
def test_rotary_embedding_matches_reference(dtype, is_neox, head_size, rot_dim, num_heads, num_kv_heads):
    cache = compute_cos_sin_cache(inv_freq(rot_dim), 300)
    positions = torch.tensor([0, 1, 299, 150, 7])
    query, key = qk(5, num_heads, num_kv_heads, head_size, dtype)
    q_ref, k_ref = query.clone(), key.clone()
    rotary_embedding_ref(positions, q_ref, k_ref, cache, head_size, is_neox)
    rotary_embedding(positions, query, key, cache, head_size, is_neox)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(query, q_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(key, k_ref, atol=atol, rtol=rtol)


def test_partial_rotary_leaves_the_tail_of_each_head_untouched():
    cache = compute_cos_sin_cache(inv_freq(32), 16)
    query, key = qk(3, 2, 1, 64, torch.float32)
    before_q, before_k = query.view(3, 2, 64)[..., 32:].clone(), key[:, 32:].clone()
    rotary_embedding(torch.tensor([1, 2, 3]), query, key, cache, 64, is_neox=True)
    assert torch.equal(query.view(3, 2, 64)[..., 32:], before_q) and torch.equal(key[:, 32:], before_k)


def test_three_dim_views_sliced_from_a_fused_qkv_rotate_in_place():
    num_heads, num_kv_heads, head_size, tokens = 4, 2, 64, 3
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_size)
    query = qkv[:, : num_heads * head_size].view(tokens, num_heads, head_size)
    key = qkv[:, num_heads * head_size:(num_heads + num_kv_heads) * head_size].view(tokens, num_kv_heads, head_size)
    cache = compute_cos_sin_cache(inv_freq(head_size), 32)
    positions = torch.tensor([4, 9, 31])
    expected = qkv.clone()
    rotary_embedding_ref(positions, expected[:, : num_heads * head_size],
                         expected[:, num_heads * head_size:(num_heads + num_kv_heads) * head_size], cache,
                         head_size, True)
    rotary_embedding(positions, query, key, cache, head_size, is_neox=True)
    torch.testing.assert_close(qkv, expected)


def test_compute_cos_sin_cache_puts_cos_then_sin_scaled():
    cache = compute_cos_sin_cache(inv_freq(8), 10, attention_scaling=0.5)
    assert cache.shape == (10, 8) and cache.dtype == torch.float32
    angles = torch.outer(torch.arange(10.0), inv_freq(8))
    torch.testing.assert_close(cache, torch.cat([angles.cos(), angles.sin()], dim=-1) * 0.5)


@pytest.mark.parametrize("change,message", [
    (dict(positions=torch.tensor([0, 1], dtype=torch.int32)), "positions must have dtype torch.int64"),
    (dict(query=torch.randn(2, 100)), "query width 100 is not a multiple of head_size 64"),
    (dict(key=torch.randn(2, 64).half()), "key dtype torch.float16 differs"),
    (dict(key=torch.randn(2, 64, 2)[..., 0]), "key must be contiguous in its last dimension"),
    (dict(cos_sin_cache=torch.randn(8, 66)), r"rot_dim\) must be even and in \(0, 64\]"),
    (dict(cos_sin_cache=torch.randn(8, 64).double()), "cos_sin_cache must have dtype torch.float32"),
])
def test_bad_layout_raises_value_error_naming_the_argument(change, message):
    args = dict(positions=torch.tensor([0, 1]), query=torch.randn(2, 128), key=torch.randn(2, 64),
                cos_sin_cache=compute_cos_sin_cache(inv_freq(64), 8))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        rotary_embedding(**args, head_size=64, is_neox=True)
