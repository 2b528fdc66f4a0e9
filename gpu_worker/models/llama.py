"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over the paged KV cache.

One definition serves all four; the differences are read off the Hugging Face config:
qkv biases (Qwen2), per-head q/k RMSNorm (Qwen3), sliding windows (Mistral), tied embeddings.
"""

from collections.abc import Iterable

import torch
from torch import nn

from conveyor.gpu_worker.attention import AttentionMetadata
from conveyor.gpu_worker.models.rotary import build_cos_sin_cache
from conveyor.kernels.quant import QuantizedWeight
from conveyor.gpu_worker.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_shape,
    divide,
    tp_size,
)

# checkpoint name fragment -> (our stacked parameter, part index)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.eps = eps


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, ops):
        super().__init__()
        self.ops = ops
        hidden = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        self.num_heads = divide(config.num_attention_heads, tp_size(), "num_attention_heads")
        self.num_kv_heads = divide(config.num_key_value_heads, tp_size(), "num_key_value_heads")
        self.scale = self.head_dim**-0.5
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = config.model_type != "qwen2" and getattr(config, "attention_bias", False)
        d = self.head_dim
        self.qkv_proj = ColumnParallelLinear(
            hidden,
            [config.num_attention_heads * d, config.num_key_value_heads * d, config.num_key_value_heads * d],
            bias=qkv_bias,
            dtype=dtype,
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, hidden, bias=o_bias, dtype=dtype)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, dtype)
        self.sliding_window = sliding_window_of(config, layer_idx)

    def forward(self, x, kv_cache, meta: AttentionMetadata, rope) -> torch.Tensor:
        ops, d = self.ops, self.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        q, k, v = q.view(-1, self.num_heads, d), k.view(-1, self.num_kv_heads, d), v.view(-1, self.num_kv_heads, d)
        if self.qk_norm:
            q = ops.rms_norm(q, self.q_norm.weight, self.q_norm.eps)
            k = ops.rms_norm(k, self.k_norm.weight, self.k_norm.eps)
        q, k = ops.rotary_embedding(rope, q, k)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = ops.attention(q, k_cache, v_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype, ops):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' for the Llama family, got {config.hidden_act!r}")
        self.ops = ops
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [size, size], bias=False, dtype=dtype)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, ops):
        super().__init__()
        self.ops = ops
        self.self_attn = LlamaAttention(config, layer_idx, dtype, ops)
        self.mlp = LlamaMLP(config, dtype, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, x, residual, kv_cache, meta, rope):
        ops, norm1, norm2 = self.ops, self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual = x
            x = ops.rms_norm(x, norm1.weight, norm1.eps)
        else:
            x, residual = ops.fused_add_rms_norm(x, residual, norm1.weight, norm1.eps)
        x = self.self_attn(x, kv_cache, meta, rope)
        x, residual = ops.fused_add_rms_norm(x, residual, norm2.weight, norm2.eps)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config, dtype: torch.dtype, ops):
        super().__init__()
        self.ops = ops
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, dtype, ops) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, kv_caches, meta, cos_sin_cache, virtual=None) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        if virtual is not None:  # prompt tuning: (token indices, their embeddings) replace the lookups
            x[virtual[0]] = virtual[1]
        rope = self.ops.prepare_rotary(positions, cos_sin_cache, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, kv_cache, meta, rope)
        x, _ = self.ops.fused_add_rms_norm(x, residual, self.norm.weight, self.norm.eps)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, dtype: torch.dtype, ops):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype, ops)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype)
        if self.tie_word_embeddings:
            self.lm_head.weight, self.lm_head.tied = self.model.embed_tokens.weight, True
        head_dim = self.model.layers[0].self_attn.head_dim
        device = self.model.embed_tokens.weight.device
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(config, head_dim, device), persistent=False)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, virtual=None) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta, self.cos_sin_cache, virtual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]]) -> set[str]:
        """Fills parameters from (checkpoint name, tensor) pairs; returns the checkpoint names used.
        A quantized tied embedding is also the LM head's quantized weight."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for checkpoint_name, tensor in weights:
            if "rotary_emb.inv_freq" in checkpoint_name:
                continue
            if self.tie_word_embeddings and checkpoint_name == "lm_head.weight":
                continue  # some tied checkpoints still carry a copy
            name, part = checkpoint_name, 0
            for fragment, (stacked, index) in STACKED_PARAMS.items():
                if f".{fragment}." in name:
                    name, part = name.replace(f".{fragment}.", f".{stacked}."), index
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {checkpoint_name!r} matches no parameter of {type(self).__name__}")
            module = self.get_submodule(name.rsplit(".", 1)[0])
            load = getattr(module, "load_weight", None)
            if load is None:
                check_shape(checkpoint_name, tensor, param.shape)
                param.data.copy_(tensor)
            else:
                load(param, tensor, part, checkpoint_name)
            if self.lm_head.tied and name == "model.embed_tokens.weight" and isinstance(tensor, QuantizedWeight):
                self.lm_head.load_weight(param, tensor, 0, checkpoint_name)
            loaded.add(checkpoint_name)
        return loaded

    def expected_weights(self) -> set[str]:
        """The checkpoint names a complete checkpoint holds for this model."""
        unstacked = {stacked: [] for stacked, _ in STACKED_PARAMS.values()}
        for fragment, (stacked, _) in STACKED_PARAMS.items():
            unstacked[stacked].append(fragment)
        expected = set()
        for name, _ in self.named_parameters():  # a tied lm_head is the embedding: listed once
            parts = [name]
            for stacked, fragments in unstacked.items():
                if f".{stacked}." in name:
                    parts = [name.replace(f".{stacked}.", f".{f}.") for f in fragments]
            expected.update(parts)
        return expected


def sliding_window_of(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return None
    return window
