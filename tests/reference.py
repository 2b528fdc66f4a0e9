"""Reference results from transformers itself, for exactness tests."""

import pathlib

import torch
from transformers import AutoModelForCausalLM

PROMPT_LENS = (1, 5, 17, 64, 300)
MAX_TOKENS = 32


def make_prompts(vocab_size: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lens]


def load_reference(model_dir: str, adapter: str | None = None):
    """transformers' model in float32, under a PEFT LoRA adapter (peft's own forward) if given."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def hf_greedy(model_dir: str, prompts, max_tokens=MAX_TOKENS, adapter: str | None = None):
    """transformers' own forward, one prompt at a time: (tokens, chosen-token logprobs)."""
    model = load_reference(model_dir, adapter)
    with torch.inference_mode():
        return [greedy_after(model, model(torch.tensor([prompt]), use_cache=True), max_tokens) for prompt in prompts]


def greedy_after(model, out, max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding from the output `out` of the prompt's forward: (tokens, chosen-token logprobs)."""
    tokens, logprobs = [], []
    for _ in range(max_tokens):
        lp = torch.log_softmax(out.logits[0, -1].float(), -1)
        token = int(lp.argmax())
        tokens.append(token)
        logprobs.append(float(lp[token]))
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


def hf_sequence_logprobs(model_dir: str, prompts, outputs, adapters=None) -> list[list[float]]:
    """transformers' logprob of each output token given the prompt and the outputs before it, one
    forward per sequence; `adapters`: each sequence's LoRA adapter directory, or None."""
    adapters = adapters or [None] * len(prompts)
    models = {adapter: load_reference(model_dir, adapter) for adapter in set(adapters)}
    results = []
    with torch.inference_mode():
        for prompt, output, adapter in zip(prompts, outputs, adapters):
            logits = models[adapter](torch.tensor([prompt + output])).logits[0, len(prompt) - 1 : -1]
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


def make_lora_adapter(model_dir: str, out_dir, rank: int, targets: list[str], seed: int, alpha: float = 16,
                      use_rslora: bool = False) -> str:
    """A PEFT LoRA adapter of random weights (A and B both nonzero, so it changes the model's tokens),
    saved by peft itself."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                        init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(model, config).save_pretrained(str(out_dir))
    return str(out_dir)


def hf_greedy_with_table(model_dir: str, prompt: list[int], table: torch.Tensor, max_tokens=MAX_TOKENS):
    """Prompt tuning by hand: the prompt embedded by transformers, the rows of `table` spliced in where
    its ids are past the vocabulary (id - vocab_size), then greedy decoding: (tokens, logprobs)."""
    model = load_reference(model_dir)
    vocab = model.config.vocab_size
    ids = torch.tensor([prompt])
    virtual = ids >= vocab
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids.masked_fill(virtual, 0))
        embeds[virtual] = table.float()[ids[virtual] - vocab]
        return greedy_after(model, model(inputs_embeds=embeds, use_cache=True), max_tokens)
