"""Engine configuration: one Struct, validated once, sent as-is to the core and the workers."""

import functools
import logging
import os

import msgspec

logger = logging.getLogger(__name__)

GiB = 1 << 30
MIN_SECRET_CHARS = 16


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
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # Schedule step N+1 while the workers run step N. None: where the workers leave the core a
    # processor of its own (CUDA; CPUs to spare), see uses_async_scheduling.
    async_scheduling: bool | None = None
    kv_cache_memory: int | None = None  # bytes per rank; default: 2 GiB on CPU, 85% of free memory on GPU
    num_kv_blocks: int | None = None  # overrides kv_cache_memory
    scheduling_policy: str = "fcfs"  # fcfs | priority
    seed: int = 0  # with each request's arrival number, the seed of a request that has none
    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"  # hot ops: auto (C kernels on CPU, Triton on CUDA) | torch | triton
    worker_threads: int | None = None  # torch threads per worker; default: usable CPUs / tensor_parallel_size
    # On a CPU, give each worker rank CPUs of its own and the engine core the CPUs left over (see
    # worker_cpus): the kernel otherwise queues the engine core behind a worker's thread while a
    # CPU sits idle, for up to milliseconds at a time.
    bind_cores: bool = True
    request_limits: RequestLimits = msgspec.field(default_factory=RequestLimits)  # the frontend's
    # Shared by a --headless core and its frontends; their tcp links then run CurveZMQ
    # (ipc/sockets.py). Required where the core listens beyond loopback.
    engine_secret: str | None = None
    # Seconds a step may take before the engine counts a worker as hung and dies naming it. The
    # default matches torch.distributed's collective timeout: a long prefill on a CPU takes minutes.
    step_timeout: float = 600.0

    def __post_init__(self) -> None:
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
