"""Continuous batching: which requests run this step, and how many tokens each computes.

One token budget per step (`max_num_batched_tokens`) is spent first on running requests
(decodes and unfinished prefill chunks), then on waiting ones, FCFS or by priority. Long prompts
are chunked so decodes keep flowing. When blocks run out, the lowest-priority running request is
preempted (freed, recomputed later). The running requests use at most `max_loras` distinct LoRA
adapters, so every step does: a waiting request of another adapter waits for one to finish.

Steps may be scheduled while earlier ones are still in flight (async scheduling): a request whose
step will sample holds a placeholder for the token until the result comes back, and its next step
computes that token's position, which the workers fill in from their own sampling. A result is
applied only to the request it was scheduled for: one finished, aborted or preempted meanwhile
drops its token (after a stop that is the one extra token async scheduling costs).

Speculative decoding: a step that reaches a request's last known token may also compute draft
tokens after it (`proposer.py`), in KV slots allocated with the step; the workers keep the
drafts the model agrees with and sample one token past them. When the result comes back, the
rejected drafts' slots are rolled back (`num_computed_tokens`, and blocks past the kept tokens
freed), and the stop conditions are checked after every kept token. A request that speculates
never has two steps in flight: its next drafts depend on how many of these are kept.
"""

import heapq
import itertools
import time
from collections import deque

from conveyor.config import EngineConfig
from conveyor.engine_core.kv_cache_manager import KVCacheManager
from conveyor.engine_core.lora_cache import LoRACache
from conveyor.engine_core.proposer import Proposer
from conveyor.engine_core.request import Request, RequestStatus
from conveyor.ipc.messages import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
)

FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class WaitingQueue:
    """FCFS, or lowest (priority, arrival) first. Preempted requests go back in front."""

    def __init__(self, policy: str):
        self.by_priority = policy == "priority"
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._tiebreak = itertools.count()

    def __len__(self) -> int:
        return len(self._heap) if self.by_priority else len(self._fifo)

    def add(self, request: Request, front: bool = False) -> None:
        if self.by_priority:
            heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._tiebreak), request))
        elif front:
            self._fifo.appendleft(request)
        else:
            self._fifo.append(request)

    def peek(self) -> Request:
        return self._heap[0][3] if self.by_priority else self._fifo[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self.by_priority else self._fifo.popleft()

    def remove(self, request: Request) -> None:
        if self.by_priority:
            self._heap = [entry for entry in self._heap if entry[3] is not request]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(request)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue(config.scheduling_policy)
        self.running: list[Request] = []
        self.known_to_workers: set[str] = set()
        self.dropped_ids: list[str] = []  # finished or preempted since the last step: workers forget them
        self.trimmed: dict[str, int] = {}  # rolled back since the last step: request -> blocks it keeps
        self.step_id = 0
        # step id -> the requests it samples for, with their preemption count when scheduled and
        # the number of draft tokens it verifies for them
        self.in_flight: dict[int, dict[str, tuple[Request, int, int]]] = {}
        self.proposer = Proposer(config.speculative_config)
        self.num_preemptions = 0
        self.num_drafts = 0  # steps of a request that verified drafts, since start
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.prefix_cache_queries = 0  # tokens looked up, since start
        self.prefix_cache_hits = 0
        self.lora_cache = LoRACache(config.max_cpu_loras)
        self.grammar_tokenizer: str | None = None  # for the workers, with the next step (structured outputs)

    # ---- requests in and out ----

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request within max_model_len (`resolve_max_tokens`) can still never run, or None."""
        total = num_prompt_tokens + max_tokens
        if not self.kv_cache.can_fit(total):
            return (f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} tokens "
                    f"exceed the whole KV cache ({self.kv_cache.num_blocks * self.config.block_size} tokens)")
        return None

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids, status: RequestStatus) -> list[Request]:
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._free(request, status)
            finished.append(request)
        return finished

    def _free(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv_cache.free(request)
        del self.requests[request.request_id]
        if request.request_id in self.known_to_workers:
            self.known_to_workers.discard(request.request_id)
            self.dropped_ids.append(request.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ----

    def schedule(self) -> SchedulerOutput | None:
        """The next step, or None when nothing can run now."""
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}  # tokens to compute, drafts included
        new_blocks: dict[str, list[int]] = {}
        drafts: dict[str, list[int]] = {}
        preempted = False

        for request in list(self.running):
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if self._reaches_limit(request):
                continue  # its last token is being sampled: it finishes when the result comes back
            if request.num_output_placeholders and self.proposer.speculates(request):
                continue  # its next drafts wait for the tokens in flight
            n = self._num_tokens_to_compute(request, budget)
            if n == 0:
                continue
            draft, lookahead = self._propose(request, n, budget - n)
            blocks = self.kv_cache.allocate_slots(request, n, num_lookahead_tokens=lookahead) if lookahead else None
            if blocks is None:
                draft = []  # drafts never preempt anyone
                while (blocks := self.kv_cache.allocate_slots(request, n)) is None:
                    victim = self._pick_victim()
                    self._preempt(victim)
                    preempted = True
                    if victim is request:
                        break
                    if victim.request_id in scheduled:  # its blocks are gone: it leaves this step too
                        budget += scheduled.pop(victim.request_id)
                        del new_blocks[victim.request_id]
                        drafts.pop(victim.request_id, None)
            if blocks is None:
                continue
            scheduled[request.request_id] = n + len(draft)
            new_blocks[request.request_id] = blocks
            if draft:
                drafts[request.request_id] = draft
            budget -= n + len(draft)

        running_loras = {r.lora_id for r in self.running if r.lora_id}
        other_loras: list[Request] = []  # waiting for a running adapter to finish
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if request.lora_id and request.lora_id not in running_loras and len(running_loras) >= self.config.max_loras:
                other_loras.append(self.waiting.pop())
                continue
            hits, num_hit_tokens = ([], 0)
            if request.num_computed_tokens == 0:
                hits, num_hit_tokens = self.kv_cache.get_computed_blocks(request)
            remaining = request.num_tokens - request.num_computed_tokens - num_hit_tokens
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            n = min(remaining, budget)
            draft, lookahead = self._propose(request, n, budget - n, num_hit_tokens)
            blocks = None
            if lookahead:
                blocks = self.kv_cache.allocate_slots(request, n, hits, num_hit_tokens, lookahead)
            if blocks is None:
                draft = []
                blocks = self.kv_cache.allocate_slots(request, n, hits, num_hit_tokens)
            if blocks is None:
                break
            self.waiting.pop()
            request.num_computed_tokens += num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.time()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if request.lora_id:
                running_loras.add(request.lora_id)
            scheduled[request.request_id] = n + len(draft)
            new_blocks[request.request_id] = blocks
            if draft:
                drafts[request.request_id] = draft
            budget -= n + len(draft)
        for request in reversed(other_loras):
            self.waiting.add(request, front=True)

        if not scheduled:
            return None  # requests dropped meanwhile reach the workers with the next step
        return self._make_output(scheduled, new_blocks, drafts)

    def _propose(self, request: Request, n: int, room: int, num_hit_tokens: int = 0) -> tuple[list[int], int]:
        """Drafts to compute after the `n` tokens of this step, if those reach the request's last
        known one: at most `room`, never past max_tokens or max_model_len (the step samples one
        token more than it keeps drafts); and the KV slots to allocate past the `n`: the drafts',
        and where the step samples, those the draft model proposes in."""
        if (request.num_output_placeholders or request.num_computed_tokens + num_hit_tokens + n < request.num_tokens
                or not self.proposer.speculates(request)):
            return [], 0
        limit = min(room, request.max_tokens - request.num_output_tokens - 1,
                    self.max_model_len - request.num_tokens - 1)
        if limit <= 0:
            return [], 0  # the step samples the request's last token
        draft = self.proposer.propose(request, limit)
        return draft, len(draft) + self.proposer.draft_slots

    def _reaches_limit(self, request: Request) -> bool:
        pending = request.num_output_placeholders
        return pending > 0 and (request.num_output_tokens + pending >= request.max_tokens
                                or request.num_tokens + pending >= self.max_model_len)

    def _num_tokens_to_compute(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens + request.num_output_placeholders - request.num_computed_tokens
        if remaining > budget and not self.config.enable_chunked_prefill:
            return 0
        return min(remaining, budget)

    def _pick_victim(self) -> Request:
        if self.waiting.by_priority:
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0  # the tokens in flight are dropped and sampled again
        request.num_preemptions += 1
        self.num_preemptions += 1
        if request.request_id in self.known_to_workers:
            self.known_to_workers.discard(request.request_id)
            self.dropped_ids.append(request.request_id)
        self.waiting.add(request, front=True)

    def _make_output(self, scheduled: dict[str, int], new_blocks: dict[str, list[int]],
                     drafts: dict[str, list[int]]) -> SchedulerOutput:
        new, new_counts = [], []
        cached = CachedRequestData()
        cached_counts = []
        samples: dict[str, tuple[Request, int, int]] = {}
        step_loras: dict[int, str] = {}
        for request_id, n in scheduled.items():
            request = self.requests[request_id]
            if request.lora_id:
                step_loras[request.lora_id] = request.lora_path
            if request_id in self.known_to_workers:
                cached.request_ids.append(request_id)
                cached.new_block_ids.append(new_blocks[request_id])
                cached.num_computed_tokens.append(request.num_computed_tokens)
                cached_counts.append(n)
            else:
                self.known_to_workers.add(request_id)
                new.append(NewRequestData(
                    request_id,
                    request.prompt_token_ids,
                    request.sampling_params,
                    self.kv_cache.get_block_ids(request_id),
                    request.num_computed_tokens,
                    request.output_token_ids,
                    request.sampling_seed,
                    request.lora_id,
                    request.prompt_embedding_table,
                ))
                new_counts.append(n)
            request.num_computed_tokens += n
            if request.num_computed_tokens >= request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1  # the step reaches its end: it samples
                samples[request_id] = (request, request.num_preemptions, len(drafts.get(request_id, ())))
        self.in_flight[self.step_id] = samples
        evictions, loads = self.lora_cache.prepare(step_loras)
        output = SchedulerOutput(self.step_id, new, cached, new_counts + cached_counts, self.dropped_ids,
                                 evictions, loads, self.grammar_tokenizer, drafts, self.trimmed)
        self.dropped_ids, self.trimmed, self.grammar_tokenizer = [], {}, None
        self.step_id += 1
        return output

    def update_from_output(self, result: ModelRunnerOutput) -> list[tuple[Request, EngineCoreOutput]]:
        outputs = []
        samples = self.in_flight.pop(result.step_id)
        grammar_ended = set(result.grammar_ended or ())
        for i, (request_id, token_ids) in enumerate(zip(result.request_ids, result.sampled_token_ids)):
            request = self._awaiting(samples, request_id)
            if request is None:
                continue
            request.num_output_placeholders -= 1
            num_drafts = samples[request_id][2]
            if num_drafts or self.proposer.draft_model:
                self._roll_back(request, num_drafts, len(token_ids) - 1)
            token_ids, status = self._append_until_stop(request, token_ids)
            if status is None and request_id in grammar_ended:
                status = RequestStatus.FINISHED_STOPPED
            if self.proposer.draft_model:
                request.spec_token_ids = result.draft_token_ids.get(request_id, []) if result.draft_token_ids else []
            logprobs = result.logprobs[i] if result.logprobs else None
            output = EngineCoreOutput(
                request_id,
                token_ids,
                new_logprobs=logprobs[:len(token_ids)] if logprobs else None,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                num_draft_tokens=num_drafts,
                num_accepted_tokens=len(result.sampled_token_ids[i]) - 1 if num_drafts else 0,
            )
            if request.num_output_tokens == len(token_ids):
                output.first_scheduled_time = request.first_scheduled_time
            if result.prompt_logprobs and request_id in result.prompt_logprobs:
                output.prompt_logprobs = result.prompt_logprobs[request_id]
            if status is not None:
                self.running.remove(request)
                self._free(request, status)
                output.finish_reason = FINISH_REASONS[status]
                output.stop_reason = request.stop_reason
            outputs.append((request, output))
        for request_id, error in (result.errors or {}).items():  # a request that failed alone
            request = self._awaiting(samples, request_id)
            if request is None:
                continue
            self.running.remove(request)
            self._free(request, RequestStatus.FINISHED_ERROR)
            outputs.append((request, EngineCoreOutput(request_id, [], finish_reason="error", error=error)))
        return outputs

    def _roll_back(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """Forget the KV slots past the step's kept tokens: the rejected drafts' and the draft
        model's. The kept drafts are computed tokens now, the token sampled after them is not yet.
        The workers drop the same blocks at their next step (`SchedulerOutput.trimmed_blocks`)."""
        if num_drafts:
            self.num_drafts += 1
            self.num_draft_tokens += num_drafts
            self.num_accepted_tokens += num_accepted
            request.num_computed_tokens -= num_drafts - num_accepted
        num_blocks = len(self.kv_cache.req_to_blocks.get(request.request_id, ()))
        if (kept := self.kv_cache.trim(request, request.num_computed_tokens)) < num_blocks:
            self.trimmed[request.request_id] = kept

    def _append_until_stop(self, request: Request, token_ids: list[int]) -> tuple[list[int], RequestStatus | None]:
        """Append the step's tokens one by one, up to the first that stops the request."""
        if len(token_ids) == 1:
            request.append_output_token_ids(token_ids)
            return token_ids, self._check_stop(request)
        for j, token in enumerate(token_ids):
            request.append_output_token_ids([token])
            if (status := self._check_stop(request)) is not None:
                return token_ids[:j + 1], status
        return token_ids, None

    @staticmethod
    def _awaiting(samples: dict[str, tuple[Request, int, int]], request_id: str) -> Request | None:
        """The request a step's result is for, unless it finished, was aborted or was preempted
        since the step was scheduled."""
        request, num_preemptions, _ = samples[request_id]
        if request.status != RequestStatus.RUNNING or request.num_preemptions != num_preemptions:
            return None
        return request

    def _check_stop(self, request: Request) -> RequestStatus | None:
        params = request.sampling_params
        last = request.output_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last == params.eos_token_id:
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                request.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def stats(self, step_time: float = 0.0, model_time: float = 0.0) -> SchedulerStats:
        prefix = self.kv_cache.make_prefix_cache_stats()  # counts since the previous call
        self.prefix_cache_queries += prefix.queries
        self.prefix_cache_hits += prefix.hits
        stats = SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache.usage,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            num_drafts=self.num_drafts,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens,
            step_time=step_time,
            model_time=model_time,
        )
        if self.config.enable_lora:
            stats.num_running_loras = len({r.lora_id for r in self.running if r.lora_id})
            stats.num_waiting_loras = len({r.lora_id for r in self.requests.values()
                                           if r.lora_id and r.status != RequestStatus.RUNNING})
            stats.num_lora_loads = self.lora_cache.num_loads
        return stats
