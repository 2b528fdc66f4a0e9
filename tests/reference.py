"""Reference results from transformers itself, for exactness tests."""

import pathlib

import torch
from transformers import AutoModelForCausalLM

PROMPT_LENS = (1, 5, 17, 64, 300)
MAX_TOKENS = 32


def make_prompts(vocab_size: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lens]


def hf_greedy(model_dir: str, prompts, max_tokens=MAX_TOKENS):
    """transformers' own forward, one prompt at a time: (tokens, chosen-token logprobs)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model(ids, use_cache=True)
            tokens, logprobs = [], []
            for _ in range(max_tokens):
                lp = torch.log_softmax(out.logits[0, -1].float(), -1)
                token = int(lp.argmax())
                tokens.append(token)
                logprobs.append(float(lp[token]))
                out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            results.append((tokens, logprobs))
    return results


def hf_sequence_logprobs(model_dir: str, prompts, outputs) -> list[list[float]]:
    """transformers' logprob of each output token given the prompt and the outputs before it, one
    forward per sequence."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    with torch.inference_mode():
        for prompt, output in zip(prompts, outputs):
            logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1]
            lp = torch.log_softmax(logits.float(), -1)
            results.append(lp.gather(1, torch.tensor(output).view(-1, 1)).view(-1).tolist())
    return results


def dequantized_model(model_dir: str, out_dir, quantization: str) -> str:
    """A copy of the model whose weights are those an engine with `quantization` ("int8", "int4")
    multiplies with: each weight the engine quantizes at load, dequantized back to float32."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from conveyor.gpu_worker.model_loader import quantized_at_load
    from conveyor.kernels.quant import LOAD_TIME_TYPES, QuantizedWeight, dequantize

    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    tied = AutoConfig.from_pretrained(model_dir).tie_word_embeddings
    for path in sorted(pathlib.Path(out_dir).glob("*.safetensors")):
        weights = quantized_at_load(iter(load_file(path).items()), LOAD_TIME_TYPES[quantization], tied)
        save_file({name: dequantize(w) if isinstance(w, QuantizedWeight) else w for name, w in weights}, path,
                  metadata={"format": "pt"})
    return str(out_dir)
