"""The CPU paged attention (C decode kernel, or its torch fallback) against the same reference the
Triton kernel is held to."""

import pytest
import torch

from conveyor.gpu_worker.attention import AttentionMetadata, torch_paged_attention
from conveyor.kernels import cpu as cpu_kernels
from conveyor.kernels.attention import paged_attention_ref

from test_kernel_attention import CONFIGS, TOL, make_batch


def run_torch_path(q, k_cache, v_cache, meta, kwargs, sliding_window, decode_kernel=None):
    # The runner's cache never holds NaN (zeroed once, finite writes): slots past a sequence's end
    # are read and masked, so they get finite garbage here instead of make_batch's poison.
    garbage = torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(1)).to(k_cache.dtype) * 100
    k_cache, v_cache = k_cache.nan_to_num() + k_cache.isnan() * garbage, v_cache.nan_to_num() + v_cache.isnan() * garbage
    q_lens = (meta["query_start_loc"][1:] - meta["query_start_loc"][:-1]).tolist()
    attn_meta = AttentionMetadata(
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
    got = torch_paged_attention(q, k_cache, v_cache, attn_meta, kwargs["scale"], sliding_window, decode_kernel)
    expected = paged_attention_ref(q, k_cache, v_cache, torch.empty_like(q), **meta, **kwargs,
                                   sliding_window=sliding_window)
    return got, expected, attn_meta


@pytest.fixture(params=["c-kernel", "torch-fallback"])
def decode_kernel(request):
    if request.param == "torch-fallback":
        return None
    kernels = cpu_kernels.load()
    assert kernels is not None, "the C kernels must build here (is a C compiler installed?)"
    return kernels.decode_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "h{}-kv{}-d{}-bs{}-win{}".format(*c))
def test_mixed_batch_matches_reference(config, dtype, decode_kernel):
    num_heads, num_kv_heads, head_dim, block_size, window = config
    q_lens, contexts = [1, 1, 1, 1, 19, 7], [70, 0, 33, 5, 0, 45]  # decodes of unequal lengths first
    q, k_cache, v_cache, meta, kwargs = make_batch(
        q_lens, contexts, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype,
    )
    got, expected, _ = run_torch_path(q, k_cache, v_cache, meta, kwargs, window, decode_kernel)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "h{}-kv{}-d{}-bs{}-win{}".format(*c))
def test_runs_of_equal_prefills_match_reference(config, dtype):
    """Equal neighbours share one SDPA call: fresh prompts (causal), chunks after a cached context
    (masked), between single prefills of other lengths."""
    num_heads, num_kv_heads, head_dim, block_size, window = config
    q_lens, contexts = [1, 12, 12, 12, 5, 5, 9, 5], [20, 0, 0, 0, 30, 30, 0, 30]
    q, k_cache, v_cache, meta, kwargs = make_batch(
        q_lens, contexts, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype,
    )
    got, expected, _ = run_torch_path(q, k_cache, v_cache, meta, kwargs, window)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_plan_is_built_once_and_shared_by_every_layer():
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1, 1], [40, 3], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
    )
    _, _, attn_meta = run_torch_path(q, k_cache, v_cache, meta, kwargs, None)
    plan = attn_meta.decode_plan
    assert plan.num_blocks == 3  # 41 tokens in blocks of 16
    assert plan.mask.shape == (2, 1, 1, 48)
    assert torch.isinf(plan.mask[1, 0, 0, 4:]).all() and (plan.mask[1, 0, 0, :4] == 0).all()
    torch_paged_attention(q, k_cache.nan_to_num(), v_cache.nan_to_num(), attn_meta, kwargs["scale"])
    assert attn_meta.decode_plan is plan


def test_c_kernel_leaves_rows_of_empty_sequences_untouched():
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1, 1], [30, 2], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
    )
    out = torch.full_like(q, 7.0)
    seq_lens = torch.tensor([31, 0], dtype=torch.int32)
    cpu_kernels.load().decode_attention(q, k_cache, v_cache, out, meta["block_tables"], seq_lens,
                                        kwargs["scale"], None)
    assert (out[1] == 7.0).all() and not out[0].isnan().any()


def test_c_kernel_rejects_a_strided_query():
    q, k_cache, v_cache, meta, kwargs = make_batch(
        [1, 1], [3, 2], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
    )
    with pytest.raises(ValueError, match="q must be a contiguous CPU tensor"):
        cpu_kernels.load().decode_attention(q[:, ::2], k_cache, v_cache, torch.empty_like(q[:, ::2]),
                                            meta["block_tables"], meta["seq_lens"], kwargs["scale"], None)
