"""The CPU paged attention (the C kernel, or the plain-torch path) against the same reference the
Triton kernel is held to."""

import pytest
import torch

from conveyor.gpu_worker.attention import AttentionMetadata, torch_paged_attention
from conveyor.kernels import cpu as cpu_kernels
from conveyor.kernels.attention import paged_attention_ref

from test_cpu_kernels import ARCHS
from test_kernel_attention import CONFIGS, TOL, make_batch


def attention_meta(meta, kwargs) -> AttentionMetadata:
    q_lens = (meta["query_start_loc"][1:] - meta["query_start_loc"][:-1]).tolist()
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64),
        query_start_loc=meta["query_start_loc"],
        seq_lens=meta["seq_lens"],
        block_tables=meta["block_tables"],
        max_query_len=kwargs["max_query_len"],
        max_seq_len=kwargs["max_seq_len"],
        num_decodes=kwargs["num_decodes"],
        query_lens_cpu=q_lens,
        seq_lens_cpu=meta["seq_lens"].tolist(),
    )


def c_kernel(arch: str):
    """The C kernel built for target ISA `arch`."""
    kernels = cpu_kernels.load(arch)
    assert kernels is not None, "the C kernels must build here (is a C compiler installed?)"

    def attention(q, k_cache, v_cache, meta: AttentionMetadata, scale, sliding_window):
        return kernels.paged_attention(q, k_cache, v_cache, torch.empty_like(q), meta.block_tables, meta.seq_lens,
                                       meta.query_start_loc, scale, sliding_window)

    return attention


def torch_path(q, k_cache, v_cache, meta: AttentionMetadata, scale, sliding_window):
    # It reads cache slots past a sequence's end and masks them: the runner's cache holds finite
    # values there (zeroed once, finite writes), so make_batch's NaN poison becomes finite garbage.
    garbage = torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(1)).to(k_cache.dtype) * 100
    k_cache, v_cache = k_cache.nan_to_num() + k_cache.isnan() * garbage, v_cache.nan_to_num() + v_cache.isnan() * garbage
    return torch_paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)


@pytest.fixture(params=[*ARCHS, "torch"])
def attention(request):
    return torch_path if request.param == "torch" else c_kernel(request.param)


def run(attention, q_lens, contexts, config, dtype):
    num_heads, num_kv_heads, head_dim, block_size, window = config
    q, k_cache, v_cache, meta, kwargs = make_batch(
        q_lens, contexts, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype,
    )
    got = attention(q, k_cache, v_cache, attention_meta(meta, kwargs), kwargs["scale"], window)
    expected = paged_attention_ref(q, k_cache, v_cache, torch.empty_like(q), **meta, **kwargs, sliding_window=window)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
# beside the shared configs: the small head dims the C kernel specialises in float32, and groups of
# query heads its bf16 decode carries in several p . v passes (4 heads a pass at head_dim 64, 2 at 128)
EACH_CONFIG = pytest.mark.parametrize("config", CONFIGS + [(4, 2, 16, 16, None), (6, 2, 32, 16, 11), (9, 3, 64, 16, None),
                                                           (8, 1, 64, 16, 21), (6, 1, 128, 16, None)],
                                      ids=lambda c: "h{}-kv{}-d{}-bs{}-win{}".format(*c))


@DTYPES
@EACH_CONFIG
def test_mixed_batch_matches_reference(config, dtype, attention):
    # decodes of unequal lengths first, then prefills (one after a cached context), as the runner orders them
    run(attention, [1, 1, 1, 1, 19, 7], [70, 0, 33, 5, 0, 45], config, dtype)


@DTYPES
@EACH_CONFIG
def test_runs_of_equal_prefills_match_reference(config, dtype, attention):
    """The torch path gives equal neighbours one SDPA call: fresh prompts (causal), chunks after a
    cached context (masked), between single prefills of other lengths."""
    run(attention, [1, 12, 12, 12, 5, 5, 9, 5], [20, 0, 0, 0, 30, 30, 0, 30], config, dtype)


@pytest.mark.parametrize("config", [(9, 3, 64, 16, None), (8, 2, 128, 32, 40)], ids=["h9-kv3-d64", "h8-kv2-d128-win40"])
def test_prefill_chunks_spanning_many_tiles_match_reference(config, attention):
    """bf16 prefill chunks of several query tiles and key blocks (the C kernel's tiled path), one
    after a cached context and one alone, beside a decode."""
    run(attention, [1, 70, 33], [50, 45, 0], config, torch.bfloat16)


@DTYPES
@pytest.mark.parametrize("arch", ARCHS)
def test_c_kernel_reads_a_strided_query(dtype, arch):
    """The model's q is a view into the fused qkv projection: tokens strided, heads packed."""
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1, 9, 1], [40, 0, 17], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype,
    )
    qkv = torch.cat([q.flatten(1), torch.full((len(q), 2 * 2 * 64), float("nan"), dtype=dtype)], dim=1)
    strided = qkv[:, : 4 * 64].view(len(q), 4, 64)
    meta = attention_meta(meta, kwargs)
    assert not strided.is_contiguous()
    attention = c_kernel(arch)
    torch.testing.assert_close(attention(strided, k_cache, v_cache, meta, kwargs["scale"], None),
                               attention(q, k_cache, v_cache, meta, kwargs["scale"], None), rtol=0, atol=0)


def test_decode_plan_is_built_once_and_shared_by_every_layer():
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1, 1], [40, 3], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
    )
    attn_meta = attention_meta(meta, kwargs)
    torch_path(q, k_cache, v_cache, attn_meta, kwargs["scale"], None)
    plan = attn_meta.decode_plan
    assert plan.num_blocks == 3  # 41 tokens in blocks of 16
    assert plan.mask.shape == (2, 1, 1, 48)
    assert torch.isinf(plan.mask[1, 0, 0, 4:]).all() and (plan.mask[1, 0, 0, :4] == 0).all()
    torch_paged_attention(q, k_cache.nan_to_num(), v_cache.nan_to_num(), attn_meta, kwargs["scale"])
    assert attn_meta.decode_plan is plan


@pytest.mark.parametrize("arch", ARCHS)
def test_c_kernel_leaves_rows_of_empty_sequences_untouched(arch):
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1, 1], [30, 2], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
    )
    out = torch.full_like(q, 7.0)
    seq_lens = torch.tensor([31, 0], dtype=torch.int32)
    cpu_kernels.load(arch).paged_attention(q, k_cache, v_cache, out, meta["block_tables"], seq_lens,
                                           meta["query_start_loc"], kwargs["scale"], None)
    assert (out[1] == 7.0).all() and not out[0].isnan().any()


def test_c_kernel_rejects_what_it_cannot_address():
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1, 1], [3, 2], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
    )
    kernels, tables, seq_lens, starts = (cpu_kernels.load(), meta["block_tables"], meta["seq_lens"],
                                         meta["query_start_loc"])
    with pytest.raises(ValueError, match="heads packed"):
        kernels.paged_attention(q[:, ::2], k_cache, v_cache, torch.empty_like(q[:, ::2]), tables, seq_lens, starts,
                                kwargs["scale"], None)
    with pytest.raises(ValueError, match="query_start_loc must have num_seqs \\+ 1 entries ending at 2"):
        kernels.paged_attention(q, k_cache, v_cache, torch.empty_like(q), tables, seq_lens, starts[:2],
                                kwargs["scale"], None)
