from conveyor.gpu_worker.models.llama import LlamaForCausalLM

# config.json `architectures` name -> implementation
MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def get_model_class(hf_config):
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported architecture {getattr(hf_config, 'architectures', None)}; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
