import enum
import time
from dataclasses import dataclass, field

from conveyor.ipc.messages import EmbeddingTable
from conveyor.sampling_params import DEFAULT_MAX_TOKENS, SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


@dataclass(slots=True, eq=False)
class Request:
    """The core's view of one request: its tokens, progress and cache blocks."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    client_index: int = 0
    arrival_time: float = field(default_factory=time.time)
    priority: int = 0
    lora_id: int = 0
    lora_path: str | None = None  # the adapter's PEFT directory
    cache_salt: str | None = None
    prompt_embedding_table: EmbeddingTable | None = None  # rows of the virtual token ids >= the vocabulary
    max_tokens: int = DEFAULT_MAX_TOKENS  # the output budget (resolve_max_tokens)
    sampling_seed: int = 0  # the seed of its random draws (conveyor/seeds.py)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # tokens that steps in flight will sample, not yet known to the core (async scheduling)
    num_output_placeholders: int = 0
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache, set when first scheduled
    block_hashes: list[int] = field(default_factory=list)  # hashes of this request's full blocks
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    # the draft model's proposals for the tokens after the last one (speculative decoding)
    spec_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)
