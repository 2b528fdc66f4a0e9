"""Throughput of one batch of requests spread over LoRA adapters, against the base model alone.

    python -m conveyor.tools.bench_lora MODEL [--requests 64] [--adapters 1 4 8] [--rank 16]

Writes random-weight PEFT adapters of every q/k/v/o/gate/up/down projection for MODEL (a Hugging
Face directory or GGUF file) into a temporary directory, starts one engine with room for all of
them in a step, and times the same batch (random prompts, greedy, fixed output length) with no
adapter and then with its requests dealt round-robin over 1, 4, 8 adapters.
"""

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

from conveyor import LLM, LoRARequest, SamplingParams
from conveyor.config import EngineConfig
from conveyor.lora import CONFIG_FILE, TARGETS, WEIGHTS_FILE, module_shapes


def write_adapter(path: str, hf_config, rank: int, seed: int) -> str:
    """A PEFT adapter of small random weights on every adaptable projection of every layer."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for target, (in_size, out_size) in module_shapes(hf_config).items():
            kind = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"base_model.model.model.layers.{layer}.{kind}.{target}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, in_size, generator=g) / in_size**0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_size, rank, generator=g) * 0.01
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}, f)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    config = EngineConfig(model=args.model)
    hf_config = config.load_hf_config()
    most = max(args.adapters)
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-lora-") as root:
        loras = [LoRARequest(f"a{i}", i + 1, write_adapter(os.path.join(root, f"a{i}"), hf_config, args.rank, i))
                 for i in range(most)]
        g = torch.Generator().manual_seed(0)
        prompts = [{"prompt_token_ids": torch.randint(3, hf_config.vocab_size, (args.prompt_len,),
                                                      generator=g).tolist()} for _ in range(args.requests)]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        with LLM(args.model, dtype=args.dtype, enable_lora=True, max_loras=most, max_cpu_loras=most,
                 max_lora_rank=args.rank, max_num_seqs=args.requests) as llm:
            llm.generate(prompts[:4], params, use_tqdm=False, lora_request=loras[:1] * 4)  # warm-up, loads one

            def tokens_per_s(n: int) -> float:
                requests = None if n == 0 else [loras[i % n] for i in range(args.requests)]
                llm.generate(prompts[:n], params, use_tqdm=False, lora_request=loras[:n] if n else None)  # loads
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False, lora_request=requests)
                return args.requests * args.output_len / (time.perf_counter() - start)

            base = tokens_per_s(0)
            print(f"{'adapters':>8} {'tokens/s':>10} {'of base':>8}")
            print(f"{0:>8} {base:>10.1f} {1.0:>8.2f}")
            for n in args.adapters:
                rate = tokens_per_s(n)
                print(f"{n:>8} {rate:>10.1f} {rate / base:>8.2f}")


if __name__ == "__main__":
    main()
