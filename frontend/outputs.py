"""What `generate()` yields: one RequestOutput per update, holding a CompletionOutput per sample."""

from dataclasses import dataclass


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position's log-probabilities: token id -> Logprob (the chosen token plus the top-N).
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    model_forward_time: float = 0.0  # summed over the steps this request was part of
    model_execute_time: float = 0.0
    num_draft_tokens: int = 0  # speculative decoding: drafts verified for this request
    num_accepted_tokens: int = 0  # of which the model kept


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error_code: int | None = None
    error_message: str | None = None

    def merge_delta(self, newer: "RequestOutput") -> None:
        """Fold a newer delta into this unread one (the consumer lagged behind)."""
        for mine, theirs in zip(self.outputs, newer.outputs):
            mine.text += theirs.text
            mine.token_ids += theirs.token_ids
            if mine.logprobs is not None and theirs.logprobs is not None:
                mine.logprobs += theirs.logprobs
            mine.cumulative_logprob = theirs.cumulative_logprob
            mine.finish_reason, mine.stop_reason = theirs.finish_reason, theirs.stop_reason
        self.finished = newer.finished
        self.num_cached_tokens = newer.num_cached_tokens
        self.metrics = newer.metrics
        self.error_code, self.error_message = newer.error_code, newer.error_message
