"""The scheduler alone, driven step by step the way the core drives it, results made up here:
in particular async scheduling, where a step is scheduled before the previous result is known."""

from conveyor.config import EngineConfig
from conveyor.engine_core.request import Request, RequestStatus
from conveyor.engine_core.scheduler import Scheduler
from conveyor.sampling_params import SamplingParams
from conveyor.ipc.messages import ModelRunnerOutput, SchedulerOutput

EOS = 2
BS = 4


def make_scheduler(num_blocks: int = 64, **config) -> Scheduler:
    return Scheduler(EngineConfig(model="unused", block_size=BS, **config), num_blocks, max_model_len=64)


def add(scheduler: Scheduler, rid: str, prompt_len: int = 6, max_tokens: int = 4, **params) -> Request:
    request = Request(rid, list(range(10, 10 + prompt_len)),
                      SamplingParams(max_tokens=max_tokens, eos_token_id=EOS, **params), max_tokens=max_tokens)
    scheduler.add_request(request)
    return request


def result(step: SchedulerOutput, tokens: dict[str, int]) -> ModelRunnerOutput:
    """What a worker returns for `step`: a token for each request given one."""
    ids = [rid for rid in step.scheduled_request_ids() if rid in tokens]
    return ModelRunnerOutput(step.step_id, ids, [[tokens[rid]] for rid in ids])


def scheduled(step: SchedulerOutput) -> dict[str, int]:
    """Request id -> the tokens it computes in `step`."""
    return dict(zip(step.scheduled_request_ids(), step.num_scheduled_tokens))


def finished(outputs) -> dict[str, str]:
    return {out.request_id: out.finish_reason for _, out in outputs if out.finish_reason}


def test_next_step_computes_the_token_still_in_flight():
    s = make_scheduler()
    r = add(s, "r", prompt_len=6)
    s0 = s.schedule()
    assert scheduled(s0) == {"r": 6}
    assert r.num_output_placeholders == 1
    s1 = s.schedule()  # before s0's result: the position of the token s0 samples
    assert scheduled(s1) == {"r": 1}
    assert s1.cached_requests.num_computed_tokens == [6]
    assert r.num_output_placeholders == 2
    s.update_from_output(result(s0, {"r": 100}))
    s.update_from_output(result(s1, {"r": 101}))
    assert r.output_token_ids == [100, 101]
    assert r.num_output_placeholders == 0
    assert r.num_computed_tokens == 7  # 101 is sampled, not yet computed


def test_no_step_past_max_tokens_while_the_last_one_is_in_flight():
    s = make_scheduler()
    r = add(s, "r", max_tokens=2)
    s0, s1 = s.schedule(), s.schedule()
    assert s.schedule() is None  # two tokens are on their way: that is max_tokens
    s.update_from_output(result(s0, {"r": 100}))
    outputs = s.update_from_output(result(s1, {"r": 101}))
    assert finished(outputs) == {"r": "length"}
    assert r.output_token_ids == [100, 101]


def test_token_after_a_stop_is_dropped():
    s = make_scheduler()
    r = add(s, "r", max_tokens=8)
    s0, s1 = s.schedule(), s.schedule()
    outputs = s.update_from_output(result(s0, {"r": EOS}))
    assert finished(outputs) == {"r": "stop"}
    assert s.update_from_output(result(s1, {"r": 555})) == []
    assert r.output_token_ids == [EOS]
    assert s.kv_cache.num_free_blocks == 64
    assert s.schedule() is None
    add(s, "next")
    assert s.schedule().finished_request_ids == ["r"]  # the workers forget it with the next step


def test_abort_in_flight_then_same_id_reused():
    s = make_scheduler()
    add(s, "r")
    s0 = s.schedule()
    s.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    fresh = add(s, "r")  # a frontend may reuse the id once the old request is gone
    s1 = s.schedule()
    assert s1.finished_request_ids == ["r"] and [n.request_id for n in s1.new_requests] == ["r"]
    assert s.update_from_output(result(s0, {"r": 100})) == []  # the old request's token
    assert fresh.output_token_ids == []
    s.update_from_output(result(s1, {"r": 200}))
    assert fresh.output_token_ids == [200]


def test_preempted_in_flight_drops_its_token_and_resumes_from_known_tokens():
    # 6 blocks of 4 tokens: prompts of 8 take 2 blocks each, positions 8-11 a third each
    s = make_scheduler(num_blocks=6, enable_prefix_caching=False)
    a = add(s, "a", prompt_len=8, max_tokens=8)
    b = add(s, "b", prompt_len=8, max_tokens=8)
    steps = [s.schedule()]
    assert scheduled(steps[0]) == {"a": 8, "b": 8}
    for k in range(1, 5):  # positions 8, 9, 10, 11, one step ahead of the results
        steps.append(s.schedule())
        assert scheduled(steps[k]) == {"a": 1, "b": 1}
        s.update_from_output(result(steps[k - 1], {"a": 100 + k - 1, "b": 200 + k - 1}))
    s5 = s.schedule()  # position 12 needs a fourth block each: b, the newest, is preempted for a
    assert b.status == RequestStatus.PREEMPTED and b.num_output_placeholders == 0
    assert scheduled(s5) == {"a": 1} and s5.finished_request_ids == ["b"]
    s.update_from_output(result(steps[4], {"a": 104, "b": 204}))
    assert a.output_token_ids == [100, 101, 102, 103, 104]
    assert b.output_token_ids == [200, 201, 202, 203]  # 204 was sampled after b's preemption
    s.update_from_output(result(s5, {"a": 105}))
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    s6 = s.schedule()
    (resumed,) = s6.new_requests
    assert resumed.request_id == "b" and resumed.output_token_ids == [200, 201, 202, 203]
    assert scheduled(s6) == {"b": 12} and b.num_output_placeholders == 1


def test_priority_victim_scheduled_earlier_in_the_step_leaves_the_step():
    """A victim already given tokens in this step must not stay in it with its blocks freed."""
    s = make_scheduler(num_blocks=2, enable_prefix_caching=False, scheduling_policy="priority")
    low = Request("low", [10, 11], SamplingParams(max_tokens=8, eos_token_id=EOS), max_tokens=8, priority=5)
    s.add_request(low)
    s.update_from_output(result(s.schedule(), {"low": 100}))
    high = Request("high", [20, 21, 22, 23], SamplingParams(max_tokens=8, eos_token_id=EOS), max_tokens=8)
    s.add_request(high)
    s.update_from_output(result(s.schedule(), {"low": 101, "high": 200}))  # both blocks used now
    step = s.schedule()  # low (position 3) fits its block; high (position 4) needs low's
    assert low.status == RequestStatus.PREEMPTED
    assert scheduled(step) == {"high": 1}
    assert step.new_requests == [] and step.finished_request_ids == ["low"]
    assert len(s.kv_cache.get_block_ids("high")) == 2


def test_sync_and_async_give_the_same_tokens():
    """The same made-up model (next token = f(last known token)) yields the same outputs whether
    results come back before the next step is scheduled or one step later."""

    def model(step: SchedulerOutput, known: dict[str, list[int]]) -> ModelRunnerOutput:
        tokens = {}
        for new in step.new_requests:
            known[new.request_id] = new.prompt_token_ids + new.output_token_ids
        for rid in step.scheduled_request_ids():
            token = EOS if known[rid][-1] == 36 else 20 + (known[rid][-1] * 7) % 30
            known[rid].append(token)
            tokens[rid] = token
        return result(step, tokens)

    def run(depth: int) -> dict[str, list[int]]:
        s = make_scheduler()
        requests = [add(s, f"r{i}", prompt_len=3 + i, max_tokens=12) for i in range(5)]
        known: dict[str, list[int]] = {}
        in_flight: list[ModelRunnerOutput] = []
        while s.has_unfinished() or in_flight:
            if len(in_flight) < depth and (step := s.schedule()) is not None:
                in_flight.append(model(step, known))
                if len(in_flight) < depth:
                    continue
            s.update_from_output(in_flight.pop(0))
        return {r.request_id: r.output_token_ids for r in requests}

    sync = run(depth=1)
    assert any(EOS in tokens for tokens in sync.values()) and any(len(t) == 12 for t in sync.values())
    assert run(depth=2) == sync
    assert run(depth=3) == sync


def test_dropped_requests_wait_for_a_step_that_runs():
    s = make_scheduler()
    add(s, "r")
    s.schedule()
    s.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    assert s.schedule() is None
    add(s, "q")
    assert s.schedule().finished_request_ids == ["r"]


def test_async_scheduling_by_default_only_where_the_core_has_a_processor(monkeypatch):
    monkeypatch.setattr("conveyor.config.usable_cpus", lambda: list(range(8)))
    config = EngineConfig(model="unused")  # the workers' threads take all 8 CPUs
    assert config.uses_async_scheduling("cuda") and not config.uses_async_scheduling("cpu")
    assert EngineConfig(model="unused", worker_threads=6).uses_async_scheduling("cpu")
    assert EngineConfig(model="unused", tensor_parallel_size=2, worker_threads=3).uses_async_scheduling("cpu")
    assert EngineConfig(model="unused", async_scheduling=True).uses_async_scheduling("cpu")
    assert not EngineConfig(model="unused", async_scheduling=False).uses_async_scheduling("cuda")


def test_cpus_split_between_worker_ranks_and_the_engine_core(monkeypatch):
    monkeypatch.setattr("conveyor.config.usable_cpus", lambda: [2, 3, 5, 7, 8, 9, 11, 12])
    config = EngineConfig(model="unused", tensor_parallel_size=2, worker_threads=3)
    assert [config.worker_cpus(0), config.worker_cpus(1)] == [[2, 3, 5], [7, 8, 9]]
    assert config.engine_core_cpus() == [11, 12]
    every_core = EngineConfig(model="unused", tensor_parallel_size=2)  # 4 threads each
    assert every_core.worker_cpus(1) == [8, 9, 11, 12] and every_core.engine_core_cpus() is None
    oversubscribed = EngineConfig(model="unused", worker_threads=9)
    assert oversubscribed.worker_cpus(0) is None and oversubscribed.engine_core_cpus() is None
    unbound = EngineConfig(model="unused", worker_threads=3, bind_cores=False)
    assert unbound.worker_cpus(0) is None and unbound.engine_core_cpus() is None


def test_a_step_holds_at_most_max_loras_adapters_and_the_others_wait():
    s = make_scheduler(enable_lora=True, max_loras=2, max_cpu_loras=3)
    for i, lora_id in enumerate([1, 2, 3, 0, 1, 3]):
        request = add(s, f"r{i}", max_tokens=1)
        request.lora_id, request.lora_path = lora_id, f"/adapter{lora_id}" if lora_id else None
    step = s.schedule()
    assert set(scheduled(step)) == {"r0", "r1", "r3", "r4"}  # adapters 1 and 2, and the base model
    assert step.lora_loads == {1: "/adapter1", 2: "/adapter2"}
    assert {n.request_id: n.lora_id for n in step.new_requests} == {"r0": 1, "r1": 2, "r3": 0, "r4": 1}
    assert [r.request_id for r in s.waiting._fifo] == ["r2", "r5"]  # waiting, in order, not failed
    outputs = s.update_from_output(result(step, {rid: 100 for rid in scheduled(step)}))
    assert set(finished(outputs)) == {"r0", "r1", "r3", "r4"}
    step = s.schedule()
    assert set(scheduled(step)) == {"r2", "r5"}
    assert step.lora_loads == {3: "/adapter3"} and step.lora_evictions == []
