"""Turns the core's raw outputs into RequestOutputs: incremental detokenization, stop strings,
logprobs, metrics, and a per-request mailbox that merges updates while its consumer lags.

`process` runs on the client's output thread, off the caller's event loop; mailboxes are fed on
their own loop, a step's worth at a time (`deliver_threadsafe`): one wake-up of the loop per step,
not one per request."""

import asyncio
import threading
import time
from dataclasses import dataclass, field

from conveyor.frontend.detokenizer import IncrementalDetokenizer
from conveyor.frontend.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from conveyor.sampling_params import RequestOutputKind, SamplingParams
from conveyor.ipc.messages import EngineCoreOutput, Logprobs


class OutputMailbox:
    """Holds at most one unread RequestOutput: deltas merge, cumulative outputs replace. One
    consumer: `get` waits on a future of its own (no Event: this runs for every request, every step)."""

    __slots__ = ("loop", "kind", "pending", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, kind: RequestOutputKind):
        self.loop = loop
        self.kind = kind
        self.pending: RequestOutput | BaseException | None = None
        self.waiter: asyncio.Future | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        pending = self.pending
        if (self.kind == RequestOutputKind.DELTA and isinstance(pending, RequestOutput)
                and isinstance(item, RequestOutput)):
            pending.merge_delta(item)
        elif not isinstance(pending, BaseException):
            self.pending = item
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> RequestOutput:
        while self.pending is None:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = self.pending
        if isinstance(item, BaseException):
            raise item  # it stays: every later get raises too
        self.pending = None
        return item


def deliver_threadsafe(deliveries: list[tuple[OutputMailbox, RequestOutput | BaseException]]) -> None:
    """Put each item in its mailbox, from any thread: one `call_soon_threadsafe` per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for delivery in deliveries:
        by_loop.setdefault(delivery[0].loop, []).append(delivery)
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:
            pass  # that loop is closed: nobody is listening any more


def _deliver(deliveries) -> None:
    for mailbox, item in deliveries:
        mailbox.put(item)


@dataclass(slots=True)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    mailbox: OutputMailbox
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    sent_tokens: int = 0  # tokens already handed out as deltas


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.lock = threading.Lock()

    def add_request(self, state: RequestState) -> None:
        if state.params.logprobs is not None:
            state.logprobs, state.cumulative_logprob = [], 0.0
        with self.lock:
            if state.request_id in self.states:
                raise ValueError(f"request_id {state.request_id!r} is already in use")
            self.states[state.request_id] = state

    def remove(self, request_id: str) -> RequestState | None:
        with self.lock:
            return self.states.pop(request_id, None)

    def process(self, outputs: list[EngineCoreOutput], model_time: float):
        """One step's outputs -> (deliveries, ids the core must abort because a stop string hit).
        The caller sends the aborts *before* delivering, so nobody sees a finished request that
        the engine still runs."""
        now = time.time()
        to_abort, deliveries = [], []
        with self.lock:
            states = [self.states.get(raw.request_id) for raw in outputs]
        for raw, state in zip(outputs, states):
            if state is None:
                continue  # aborted meanwhile
            finish_reason, stop_reason = raw.finish_reason, raw.stop_reason
            if state.detokenizer is not None and raw.new_token_ids:
                stop_terminated = finish_reason == "stop" and stop_reason is None or isinstance(stop_reason, int)
                num_tokens = len(raw.new_token_ids)
                stop_str = self._detokenize(state.detokenizer, raw, stop_terminated)
                # a stop string before this output's last token ends it, whatever ended the request
                if stop_str is not None and (finish_reason is None or len(raw.new_token_ids) < num_tokens):
                    if finish_reason is None:
                        to_abort.append(raw.request_id)
                    finish_reason, stop_reason = "stop", stop_str
            self._record(state, raw, now, model_time)
            finished = finish_reason is not None
            if finished:
                self.remove(raw.request_id)
                state.metrics.finished_time = now
            output = self._make_output(state, finished, finish_reason, stop_reason, raw.error)
            if output is not None:
                deliveries.append((state.mailbox, output))
        return deliveries, to_abort

    @staticmethod
    def _detokenize(detokenizer: IncrementalDetokenizer, raw: EngineCoreOutput, stop_terminated: bool) -> str | None:
        """Feed the new tokens to the detokenizer; the stop string they complete, if any. Several
        tokens (speculative decoding) go one at a time when stop strings are set, and those after
        the one that completes a stop string are dropped, as if they had never been sampled."""
        ids = raw.new_token_ids
        if len(ids) == 1 or not detokenizer.params.stop:
            return detokenizer.update(ids, stop_terminated=stop_terminated)
        for j, token in enumerate(ids):
            last = j == len(ids) - 1
            if (stop_str := detokenizer.update([token], stop_terminated=stop_terminated and last)) is not None:
                if not last:
                    raw.new_token_ids = ids[:j + 1]
                    raw.new_logprobs = raw.new_logprobs[:j + 1] if raw.new_logprobs else raw.new_logprobs
                return stop_str
        return None

    def fail_all(self, error: BaseException) -> None:
        with self.lock:
            states, self.states = list(self.states.values()), {}
        deliver_threadsafe([(state.mailbox, error) for state in states])

    def _record(self, state: RequestState, raw: EngineCoreOutput, now: float, model_time: float) -> None:
        metrics = state.metrics
        if raw.first_scheduled_time is not None:
            metrics.first_scheduled_time = raw.first_scheduled_time
        if raw.new_token_ids:
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
        metrics.model_forward_time += model_time
        metrics.model_execute_time += model_time
        if raw.num_draft_tokens:
            metrics.num_draft_tokens += raw.num_draft_tokens
            metrics.num_accepted_tokens += raw.num_accepted_tokens
        state.num_cached_tokens = raw.num_cached_tokens
        if raw.prompt_logprobs is not None:
            state.prompt_logprobs = [self.to_position_logprobs(entry) for entry in raw.prompt_logprobs]
        state.token_ids.extend(raw.new_token_ids)
        if state.logprobs is not None and raw.new_logprobs:
            for entry in raw.new_logprobs:
                state.logprobs.append(self.to_position_logprobs(entry))
                state.cumulative_logprob += entry.logprob

    def to_position_logprobs(self, entry: Logprobs | None) -> PositionLogprobs | None:
        if entry is None:
            return None
        decode = self.tokenizer.convert_ids_to_tokens if self.tokenizer is not None else None
        result = {entry.token_id: Logprob(entry.logprob, entry.rank, decode(entry.token_id) if decode else None)}
        for rank, (token_id, logprob) in enumerate(zip(entry.top_token_ids, entry.top_logprobs), start=1):
            if token_id not in result:
                result[token_id] = Logprob(logprob, rank, decode(token_id) if decode else None)
        return result

    def _make_output(self, state, finished, finish_reason, stop_reason, error) -> RequestOutput | None:
        kind = state.params.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        detok = state.detokenizer
        if kind == RequestOutputKind.DELTA:
            token_ids = state.token_ids[state.sent_tokens:]
            logprobs = state.logprobs[state.sent_tokens:] if state.logprobs is not None else None
            text = detok.get_delta_text(finished) if detok else ""
            state.sent_tokens = len(state.token_ids)
        else:
            token_ids = list(state.token_ids)
            logprobs = list(state.logprobs) if state.logprobs is not None else None
            text = detok.get_output_text(finished) if detok else ""
        completion = CompletionOutput(0, text, token_ids, state.cumulative_logprob, logprobs,
                                      finish_reason, stop_reason)
        # positional: this runs for every request, every step (RequestOutput's field order)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, [completion], finished,
                             state.prompt_logprobs, state.num_cached_tokens, state.metrics,
                             400 if error else None, error)
