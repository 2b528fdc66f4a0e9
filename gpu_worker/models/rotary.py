"""Rotary position embedding tables, computed the way transformers computes them (llama3, yarn,
linear and the other scalings come from transformers' own init functions)."""

import torch

# `longrope` is left out: transformers switches its frequencies by the length of the whole forward
# call, which a table shared by every sequence of a step cannot follow. `dynamic` is the default
# table up to max_position_embeddings, which bounds max_model_len.
SUPPORTED_ROPE_TYPES = ("default", "dynamic", "linear", "llama3", "proportional", "yarn")


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)  # transformers >= 5
    if params is None:  # transformers 4: rope_scaling plus a separate rope_theta
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


def build_cos_sin_cache(config, head_dim: int, device: torch.device | str = "cpu",
                        freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """[max_position_embeddings, rot_dim] float32 on `device`: cos in the first half, sin in the
    second. Computed on the CPU whatever the default device, so every device gets the same table.
    `freq_factors` divide the frequencies (a GGUF file's `rope_freqs`: llama3 scaling)."""
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    with torch.device("cpu"):
        if rope_type == "default":
            base = params["rope_theta"]
            dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.cpu()
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.float())
        table = torch.cat((freqs.cos() * scaling, freqs.sin() * scaling), dim=-1)
    return table.to(device)
