"""LoRA adapters: the request that names one, and the PEFT files that hold one.

An adapter is a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`) whose low-rank
pairs target the Llama family's q/k/v/o/gate/up/down projections. The frontend checks an adapter
against the model (`check_adapter`) before a request names it; each worker rank reads it
(`read_adapter`) and keeps its shard. An adapter id names one adapter for the engine's lifetime.
"""

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
INT32_MAX = 2**31 - 1
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TENSOR_NAME = re.compile(
    r"base_model\.model\.(model\.layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+))\.lora_([AB])\.weight")


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for a request, as vLLM spells it: `LoRARequest(name, id, path)`. Or, as the seed's
    API carries one, in memory: `lora_weights` (PEFT tensor names -> tensors) with `lora_config`
    (adapter_config.json's fields), sent once; later requests may name only the id, which runs while
    the engine still holds the adapter and fails, asking for the weights again, once it was evicted."""

    lora_name: str
    lora_int_id: int
    lora_path: str | None = None
    lora_weights: dict[str, Any] | None = None
    lora_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not (isinstance(self.lora_int_id, int) and not isinstance(self.lora_int_id, bool)
                and 1 <= self.lora_int_id <= INT32_MAX):
            raise ValueError(f"lora_int_id must be an int in [1, {INT32_MAX}], got {self.lora_int_id!r}")
        if self.lora_path is not None and (not isinstance(self.lora_path, str) or not self.lora_path):
            raise ValueError(f"lora_path must be a non-empty string if given, got {self.lora_path!r}")
        if self.lora_weights is not None:
            if not (isinstance(self.lora_weights, dict) and self.lora_weights and all(
                    isinstance(name, str) and hasattr(t, "detach") for name, t in self.lora_weights.items())):
                raise ValueError("lora_weights must be a non-empty dict of PEFT tensor names to torch tensors")
            if self.lora_config is None:
                raise ValueError("lora_weights need lora_config (adapter_config.json's fields) beside them")
            if self.lora_path is not None:
                raise ValueError("lora_path must be None for an adapter given in memory (lora_weights)")
        elif self.lora_config is not None:
            raise ValueError("lora_config goes with lora_weights (an adapter given in memory), which are missing")
        if self.lora_config is not None and not isinstance(self.lora_config, dict):
            raise ValueError(f"lora_config must be a dict of adapter_config.json's fields, got "
                             f"{type(self.lora_config).__name__}")


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    rank: int
    scaling: float  # alpha / rank, or alpha / sqrt(rank) with rslora


def read_adapter_config(config: dict, where: str) -> AdapterConfig:
    """The fields Conveyor uses from a PEFT LoRA config; a feature it does not implement is refused."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type must be LORA, got {config.get('peft_type')!r}")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"{where}: r must be an int >= 1, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        raise ValueError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    for key, what in (("use_dora", "DoRA"), ("rank_pattern", "per-module ranks (rank_pattern)"),
                      ("alpha_pattern", "per-module alphas (alpha_pattern)"),
                      ("modules_to_save", "fully trained modules (modules_to_save)"),
                      ("layers_to_transform", "a subset of layers (layers_to_transform)"),
                      ("fan_in_fan_out", "transposed weights (fan_in_fan_out)")):
        if config.get(key):
            raise ValueError(f"{where}: adapters with {what} are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias must be 'none', got {config.get('bias')!r}")
    targets = config.get("target_modules") or []
    for target in [targets] if isinstance(targets, str) else targets:
        if any(word in target for word in ("lm_head", "embed")):
            raise ValueError(f"{where}: target_modules may name only {', '.join(TARGETS)}; the LM head and "
                             f"embeddings cannot be adapted, got {target!r}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return AdapterConfig(rank, scaling)


def parse_tensor_name(name: str, where: str) -> tuple[str, str, int]:
    """(module, 'A' or 'B', layer) of a PEFT LoRA tensor name; any other tensor is refused."""
    match = _TENSOR_NAME.fullmatch(name)
    if match is None or match.group(3) not in TARGETS:
        raise ValueError(f"{where}: tensor {name!r} is not a LoRA pair of a {'/'.join(TARGETS)} projection "
                         "(the LM head and embeddings cannot be adapted)")
    return match.group(1), match.group(4), int(match.group(2))


def module_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """(input, output) size of every adaptable projection of the Llama family."""
    hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head_dim, hf_config.num_key_value_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def check_adapter(path: str, hf_config, max_lora_rank: int) -> AdapterConfig:
    """Read `path`'s config and tensor headers (no weights) and check them against the model."""
    config = load_config(path)
    where = f"LoRA adapter {path}"
    adapter = read_adapter_config(config, where)
    if adapter.rank > max_lora_rank:
        raise ValueError(f"{where}: rank {adapter.rank} exceeds max_lora_rank ({max_lora_rank})")
    from safetensors import safe_open

    shapes = module_shapes(hf_config)
    try:
        f = safe_open(weights_path(path), framework="pt")
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own error type
        raise ValueError(f"{where}: {WEIGHTS_FILE} is not a safetensors file: {exc}") from None
    with f:
        names = list(f.keys())
        if not names:
            raise ValueError(f"{where}: {WEIGHTS_FILE} holds no tensors")
        for name in names:
            module, side, layer = parse_tensor_name(name, where)
            if layer >= hf_config.num_hidden_layers:
                raise ValueError(f"{where}: tensor {name!r} names layer {layer}; the model has "
                                 f"{hf_config.num_hidden_layers}")
            in_size, out_size = shapes[module.rsplit(".", 1)[1]]
            expected = (adapter.rank, in_size) if side == "A" else (out_size, adapter.rank)
            shape = tuple(f.get_slice(name).get_shape())
            if shape != expected:
                raise ValueError(f"{where}: tensor {name!r} has shape {shape}, expected {expected}")
            pair = name.replace(f"lora_{side}", f"lora_{'B' if side == 'A' else 'A'}")
            if pair not in names:
                raise ValueError(f"{where}: tensor {name!r} has no {pair!r}")
    return adapter


def read_adapter(path: str) -> tuple[AdapterConfig, dict[str, dict[str, Any]]]:
    """The adapter's config and tensors: module name (model.layers.0.self_attn.q_proj) -> {'A', 'B'}."""
    from safetensors.torch import load_file

    where = f"LoRA adapter {path}"
    adapter = read_adapter_config(load_config(path), where)
    modules: dict[str, dict[str, Any]] = {}
    for name, tensor in load_file(weights_path(path)).items():
        module, side, _ = parse_tensor_name(name, where)
        modules.setdefault(module, {})[side] = tensor
    return adapter, modules


def load_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"LoRA adapter {path}: cannot read {CONFIG_FILE}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"LoRA adapter {path}: {CONFIG_FILE} must hold an object")
    return config


def weights_path(path: str) -> str:
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"LoRA adapter {path}: {WEIGHTS_FILE} is missing")
    return file


def lora_id_for_path(path: str) -> int:
    """The id a server gives the adapter at `path`: the same in every API server of an engine."""
    digest = hashlib.sha256(os.path.abspath(path).encode()).digest()
    return int.from_bytes(digest[:4], "little") % INT32_MAX + 1


def save_adapter(directory: str, weights: dict[str, Any], config: dict) -> None:
    """Write an adapter given in memory as a PEFT directory, which the workers read as any other."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    try:
        text = json.dumps(config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"lora_config must hold adapter_config.json's fields (JSON values): {exc}") from None
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(text)
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()},
              os.path.join(directory, WEIGHTS_FILE))
