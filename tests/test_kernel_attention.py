"""paged_attention and its split-KV decode variant against paged_attention_ref (Triton interpreter)."""

import pytest
import torch

from conveyor.kernels import attention
from conveyor.kernels.attention import (
    choose_num_splits,
    paged_attention,
    paged_attention_decode_split_kv,
    paged_attention_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp16 runs the GPU code path (probabilities rounded to fp16 before P @ V); the interpreter truncates bf16 stores.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_batch(q_lens, contexts, *, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """A flattened batch whose sequence b has contexts[b] earlier tokens cached plus q_lens[b] new ones.
    Blocks are shuffled; unused blocks and the tails past each sequence are NaN (must never be read)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(contexts, q_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    block_tables = torch.zeros(len(q_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    for b, (n, seq_len) in enumerate(zip(blocks_per_seq, seq_lens)):
        block_tables[b, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
        for pos in range(seq_len):
            block, offset = block_tables[b, pos // block_size], pos % block_size
            k_cache[block, offset] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
            v_cache[block, offset] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = dict(
        query_start_loc=query_start_loc,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
    )
    kwargs = dict(
        scale=head_dim**-0.5, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        num_decodes=sum(1 for q_len in q_lens if q_len == 1),
    )
    return q, k_cache, v_cache, meta, kwargs


def poisoned_out(q):
    """`out` as a view into a NaN buffer with a guard row either side, to catch unwritten and stray writes."""
    buffer = torch.full((q.shape[0] + 2, *q.shape[1:]), float("nan"), dtype=q.dtype)
    return buffer, buffer[1:-1]


def check_against_ref(fn, q, k_cache, v_cache, meta, kwargs, dtype, sliding_window=None, **extra):
    kwargs = dict(kwargs, sliding_window=sliding_window)
    buffer, out = poisoned_out(q)
    result = fn(q, k_cache, v_cache, out, **meta, **kwargs, **extra)
    assert result is out
    assert buffer[0].isnan().all() and buffer[-1].isnan().all(), "kernel wrote outside out"
    assert not out.isnan().any(), "kernel left elements of out unwritten"
    expected = paged_attention_ref(q, k_cache, v_cache, torch.empty_like(q), **meta, **kwargs)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


# (num_heads, num_kv_heads, head_dim, block_size, sliding_window)
CONFIGS = [
    (4, 4, 64, 16, None),   # MHA
    (4, 2, 80, 16, None),   # GQA 2, head_dim not a power of two
    (8, 2, 128, 32, None),  # GQA 4
    (4, 1, 64, 32, None),   # MQA
    (6, 2, 80, 32, 13),     # GQA 3 (padded group), sliding window
    (4, 2, 128, 16, 40),    # sliding window spanning blocks
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "h{}-kv{}-d{}-bs{}-win{}".format(*c))
def test_mixed_decode_and_chunked_prefill_batch_matches_reference(config, dtype):
    num_heads, num_kv_heads, head_dim, block_size, window = config
    # decodes first (one with a long context, one a one-token prompt), then a fresh odd-length prompt,
    # then a chunked prefill whose earlier chunk is already cached
    q_lens, contexts = [1, 1, 1, 19, 7], [70, 0, 33, 0, 45]
    q, k_cache, v_cache, meta, kwargs = make_batch(
        q_lens, contexts, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype,
    )
    check_against_ref(paged_attention, q, k_cache, v_cache, meta, kwargs, dtype, sliding_window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_prefill_tiles_spanning_many_query_blocks_match_reference(dtype):
    q_lens, contexts = [130, 3], [21, 0]  # 130 query tokens: several query tiles in one sequence
    q, k_cache, v_cache, meta, kwargs = make_batch(
        q_lens, contexts, num_heads=2, num_kv_heads=1, head_dim=64, block_size=16, dtype=dtype,
    )
    check_against_ref(paged_attention, q, k_cache, v_cache, meta, kwargs, dtype)


@pytest.mark.parametrize("window", [None, 20])
def test_all_decode_batch_matches_reference(window):
    q_lens, contexts = [1, 1, 1], [0, 100, 31]
    q, k_cache, v_cache, meta, kwargs = make_batch(
        q_lens, contexts, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16,
    )
    check_against_ref(paged_attention, q, k_cache, v_cache, meta, kwargs, torch.float16, sliding_window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("num_splits,window", [(1, None), (3, None), (8, None), (4, 50)])
def test_split_kv_decode_matches_reference(num_splits, window, dtype):
    # 8 splits of a 1-token context leave most splits empty; they must merge as nothing
    q_lens, contexts = [1, 1, 1], [150, 0, 37]
    q, k_cache, v_cache, meta, kwargs = make_batch(
        q_lens, contexts, num_heads=4, num_kv_heads=2, head_dim=80, block_size=16, dtype=dtype,
    )
    check_against_ref(paged_attention_decode_split_kv, q, k_cache, v_cache, meta, kwargs, dtype,
                      sliding_window=window, num_splits=num_splits)


def test_decode_batch_with_few_long_sequences_dispatches_to_split_kv(monkeypatch):
    calls = []
    launch = attention._launch_split_kv
    monkeypatch.setattr(attention, "_launch_split_kv", lambda *args: calls.append(args[-1]) or launch(*args))
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1], [600], num_heads=2, num_kv_heads=1, head_dim=64, block_size=32, dtype=torch.float32,
    )
    check_against_ref(paged_attention, q, k_cache, v_cache, meta, kwargs, torch.float32)
    assert calls == [2]  # 600 keys: two splits of at least 256


def test_padding_tokens_and_empty_sequences_are_left_untouched():
    # CUDA-graph style padding: a trailing sequence with no tokens, and two token rows past the batch
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1, 1], [600, 9], num_heads=2, num_kv_heads=1, head_dim=64, block_size=32, dtype=torch.float32,
    )
    meta["query_start_loc"] = torch.tensor([0, 1, 2, 2], dtype=torch.int32)
    meta["seq_lens"] = torch.tensor([601, 10, 0], dtype=torch.int32)
    meta["block_tables"] = torch.cat([meta["block_tables"], torch.zeros_like(meta["block_tables"][:1])])
    padded_q = torch.cat([q, torch.randn(2, *q.shape[1:])])
    out = torch.full_like(padded_q, float("nan"))
    paged_attention(padded_q, k_cache, v_cache, out, **meta, **kwargs)
    assert out[2:].isnan().all()
    expected = paged_attention_ref(padded_q, k_cache, v_cache, torch.empty_like(padded_q), **meta, **kwargs)
    torch.testing.assert_close(out[:2], expected[:2], atol=1e-5, rtol=1e-5)


def test_num_splits_heuristic_fills_the_device_without_tiny_splits():
    cpu = torch.device("cpu")  # counts as a 132-SM device
    assert choose_num_splits(num_seqs=256, num_kv_heads=8, max_context=32768, device=cpu) == 1
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_context=300, device=cpu) == 1
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_context=32768, device=cpu) == 33
    assert choose_num_splits(num_seqs=1, num_kv_heads=1, max_context=10**6, device=cpu) == 64


def test_reference_handles_block_size_one():
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1, 4], [5, 2], num_heads=2, num_kv_heads=1, head_dim=64, block_size=1, dtype=torch.float32,
    )
    check_against_ref(paged_attention, q, k_cache, v_cache, meta, kwargs, torch.float32)


def test_empty_batch_is_a_no_op():
    q = torch.empty(0, 2, 64)
    k_cache = torch.zeros(2, 16, 1, 64)
    out = torch.empty_like(q)
    meta = dict(query_start_loc=torch.zeros(1, dtype=torch.int32), seq_lens=torch.zeros(0, dtype=torch.int32),
                block_tables=torch.zeros(0, 1, dtype=torch.int32))
    assert paged_attention(q, k_cache, k_cache, out, **meta, scale=1.0, max_query_len=0, max_seq_len=0) is out


def _valid_inputs():
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1, 3], [4, 0], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16,
    )
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, out=torch.empty_like(q), **meta), kwargs


@pytest.mark.parametrize("name,bad,message", [
    ("k_cache", lambda t: t.transpose(2, 3), "k_cache must be contiguous in its last dimension"),
    ("k_cache", lambda t: t.float(), "k_cache must have dtype torch.float16"),
    ("out", lambda t: t[:, :2], "out must have shape"),
    ("query_start_loc", lambda t: t.long(), "query_start_loc must have dtype torch.int32"),
    ("block_tables", lambda t: t[:1], "block_tables must have shape"),
    ("v_cache", lambda t: t[:, :8], "v_cache must have shape"),
    ("k_cache", lambda t: t[:, :, :1].repeat(1, 1, 3, 1), "num_heads 4 must be a multiple of num_kv_heads 3"),
])
def test_bad_layout_raises_value_error_naming_the_argument(name, bad, message):
    inputs, kwargs = _valid_inputs()
    inputs[name] = bad(inputs[name])
    if name == "k_cache" and "multiple" in message:
        inputs["v_cache"] = inputs["k_cache"].clone()
    with pytest.raises(ValueError, match=message):
        paged_attention(**inputs, **kwargs)


def test_split_kv_rejects_prefill_batches():
    inputs, kwargs = _valid_inputs()
    with pytest.raises(ValueError, match="decode batches only"):
        paged_attention_decode_split_kv(**inputs, **kwargs)
