"""Every message that crosses a process boundary, as msgspec Structs (msgpack on the wire).

Structs are array-like and omit defaults; add new fields only at the end of a Struct. A family's
members carry a tag, so one decoder reads every message of a socket.
"""

import msgspec

from conveyor.config import EngineConfig
from conveyor.sampling_params import SamplingParams


class Message(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


# ---- logprobs, shared by core and workers -------------------------------------------------------


class Logprobs(msgspec.Struct, array_like=True, gc=False):
    """Log-probabilities at one position: the chosen token's, and the top-N of the distribution."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


# ---- frontend -> core ---------------------------------------------------------------------------

EMBEDDING_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}  # name -> bytes per value


class EmbeddingTable(msgspec.Struct, array_like=True, gc=False):
    """A request's prompt-tuning table, raw (no pickle): row i is the embedding of the virtual token
    id vocab_size + i. The core checks it without torch (`problem`); workers view `data` as a tensor."""

    dtype: str
    shape: list[int]  # [rows, hidden_size]
    data: bytes

    def problem(self, hidden_size: int) -> str | None:
        """Why the table cannot be a model's (`hidden_size`) prompt-tuning table, or None."""
        if self.dtype not in EMBEDDING_DTYPES:
            return f"prompt_embedding_table must be of dtype {', '.join(EMBEDDING_DTYPES)}, got {self.dtype}"
        if len(self.shape) != 2 or self.shape[0] < 1 or self.shape[1] != hidden_size:
            return f"prompt_embedding_table must have shape [rows >= 1, {hidden_size}], got {self.shape}"
        if len(self.data) != self.shape[0] * self.shape[1] * EMBEDDING_DTYPES[self.dtype]:
            return f"prompt_embedding_table holds {len(self.data)} bytes, not a {self.dtype} table of {self.shape}"
        return None



class EngineCoreRequest(Message, tag="req"):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    client_index: int = 0
    priority: int = 0
    lora_id: int = 0  # 0: the base model
    cache_salt: str | None = None
    lora_path: str | None = None  # the adapter's PEFT directory; None: one the engine holds already
    prompt_embedding_table: EmbeddingTable | None = None


class Abort(Message, tag="abort"):
    request_ids: list[str]
    client_index: int = 0


class Hello(Message, tag="hello"):
    """A frontend announces itself and where the core should send its outputs; the core answers
    with EngineReady once it can take requests."""

    client_index: int
    output_address: str


class Heartbeat(Message, tag="beat"):
    """Sent both ways when a link has been quiet for HEARTBEAT_S, so each side notices the other's
    death without a process handle (a core on another host, or frontends in other processes)."""

    client_index: int = 0


class Goodbye(Message, tag="bye"):
    """A frontend leaves: the core aborts whatever it still runs for it and forgets it."""

    client_index: int = 0


class UtilityCall(Message, tag="call"):
    """A request/response call into the core (stats, reset_prefix_cache, ...)."""

    call_id: int
    method: str
    args: list = []
    client_index: int = 0


EngineCoreInput = EngineCoreRequest | Abort | Hello | UtilityCall | Heartbeat | Goodbye


# ---- core -> frontend ---------------------------------------------------------------------------


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprobs] | None = None
    prompt_logprobs: list[Logprobs | None] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    error: str | None = None
    num_draft_tokens: int = 0  # drafts the step verified (speculative decoding)
    num_accepted_tokens: int = 0  # of which the model kept


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    step_time: float = 0.0  # wall time of the last step
    model_time: float = 0.0  # of which the workers' forward + sample
    num_steps: int = 0  # since start, with the two totals below
    total_step_time: float = 0.0
    total_model_time: float = 0.0
    num_running_loras: int = 0  # distinct LoRA adapters among the running requests
    num_waiting_loras: int = 0  # and among the waiting ones
    num_lora_loads: int = 0  # adapters the workers loaded, reloads after eviction included, since start
    num_drafts: int = 0  # since start: steps of a request that verified drafts
    num_draft_tokens: int = 0  # the drafts they verified
    num_accepted_tokens: int = 0  # the drafts the model kept


class EngineCoreOutputs(Message, tag="out"):
    outputs: list[EngineCoreOutput]
    timestamp: float
    stats: SchedulerStats | None = None


class UtilityResult(Message, tag="result"):
    call_id: int
    result: object = None
    error: str | None = None


class EngineDead(Message, tag="dead"):
    """The core's last word: why it is going down."""

    reason: str


class EngineReady(Message, tag="engine_ready"):
    max_model_len: int
    num_kv_blocks: int


EngineCoreOutputMessage = EngineCoreOutputs | UtilityResult | EngineDead | EngineReady | Heartbeat


# ---- core -> workers ----------------------------------------------------------------------------


class NewRequestData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request the workers have not seen (or dropped at preemption): its full state."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    output_token_ids: list[int] = []  # tokens generated before a preemption
    sampling_seed: int = 0  # Request.sampling_seed
    lora_id: int = 0
    prompt_embedding_table: EmbeddingTable | None = None


class CachedRequestData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The running requests the workers hold: only what changed, one list per field, which decodes
    in about half the time of a struct per request (docs/architecture.md)."""

    request_ids: list[str] = []
    new_block_ids: list[list[int]] = []
    num_computed_tokens: list[int] = []


class SchedulerOutput(Message, tag="step"):
    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: CachedRequestData
    num_scheduled_tokens: list[int]  # per request: the new ones, then the cached ones, in order
    finished_request_ids: list[str]  # finished or preempted: workers drop their state
    lora_evictions: list[int] = []  # adapters to drop, before the loads
    lora_loads: dict[int, str] = {}  # adapter id -> PEFT directory, to load before the forward
    grammar_tokenizer: str | None = None  # xgrammar's view of the tokenizer (a frontend's), sent once
    # request -> tokens it computes after its last known one, which the workers verify: its
    # num_scheduled_tokens counts them
    draft_token_ids: dict[str, list[int]] = {}
    # request -> how many of its blocks it keeps: the core freed those past its kept tokens (rejected
    # drafts) since the last step; applied before this step's new block ids
    trimmed_blocks: dict[str, int] = {}

    def scheduled_request_ids(self) -> list[str]:
        """The requests of `num_scheduled_tokens`, in its order."""
        return [new.request_id for new in self.new_requests] + self.cached_requests.request_ids


class WorkerCall(Message, tag="wcall"):
    method: str
    args: list = []


class Shutdown(Message, tag="shutdown"):
    pass


WorkerInput = SchedulerOutput | WorkerCall | Shutdown


# ---- workers -> core ----------------------------------------------------------------------------


class ModelRunnerOutput(Message, tag="mro"):
    step_id: int
    request_ids: list[str]  # requests that sampled this step, in order
    sampled_token_ids: list[list[int]]  # per request: its kept drafts and the token after them
    logprobs: list[list[Logprobs] | None] | None = None  # per request: one per sampled token
    prompt_logprobs: dict[str, list[Logprobs | None]] | None = None
    model_time: float = 0.0
    errors: dict[str, str] | None = None  # requests that failed alone this step (not in request_ids)
    grammar_ended: list[str] | None = None  # requests whose structured output is complete with this token
    # the draft model's proposals for each request's next step (speculative decoding)
    draft_token_ids: dict[str, list[int]] | None = None


class WorkerReady(Message, tag="ready"):
    rank: int
    num_gpu_blocks: int
    max_model_len: int  # the engine's limit, resolved against the model's config where it is loaded
    device_type: str = "cpu"  # where the rank runs the model: cpu | cuda
    vocab_size: int = 0  # the model's: the core refuses requests with token ids beyond it
    hidden_size: int = 0  # the width of a prompt-tuning table's rows


class WorkerResult(Message, tag="wresult"):
    result: object = None


class WorkerError(Message, tag="werror"):
    rank: int
    error: str


WorkerOutput = ModelRunnerOutput | WorkerReady | WorkerResult | WorkerError


# ---- process bootstrap payloads (sent on a child's stdin, see ipc/process.py) --------------------


class CorePayload(msgspec.Struct):
    config: EngineConfig
    input_address: str  # the core binds it; every frontend connects
    output_address: str | None  # the spawning frontend's output socket (client 0); None: headless
    ipc_dir: str


class ApiServerPayload(msgspec.Struct):
    """One API-server process of `conveyor serve --api-server-count K`."""

    args: dict  # the `conveyor serve` arguments, as parsed
    engine_address: str  # the shared core's input socket
    listen_fd: int  # the HTTP listening socket, shared by every API server
    ipc_dir: str  # the supervisor's (metrics of all servers, a local core's sockets): removed if it dies


class WorkerPayload(msgspec.Struct):
    config: EngineConfig
    rank: int
    input_ring: str  # the core's steps and calls for this rank (ipc/shm_ring.py)
    output_ring: str  # this rank's results back to the core
    dist_init_file: str  # torch.distributed rendezvous (file://, no port to pick)
