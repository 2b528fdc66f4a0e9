"""Run one benchmark backend in this process and write what it measured as JSON.

The benchmark tools start this file as a script, one process per backend, so that each backend's
memory is measured alone and each runs the same timing code. Only the standard library is imported
at module level: the vLLM and llama.cpp backends run this file with the python of their own
virtualenvs (`.venv-vllm`, `.venv-llamacpp`), where Conveyor is not installed (and Conveyor never
imports either).

    python tools/bench_runner.py WORKLOAD.json RESULT.json

WORKLOAD.json holds {"backend", "mode": "throughput" | "latency", "model", "dtype", "engine_args",
"warmup": [[prompt ids...]...], "runs": [[[prompt ids...]...]...], "output_len", "threads" (llamacpp:
the CPU threads Conveyor's workers would use)}: each run is one
timed batch (throughput) or one timed single-request stream per prompt (latency).
"""

import asyncio
import json
import statistics
import sys
import time

PROCESS_START = time.perf_counter()


class ConveyorBackend:
    """Conveyor's offline `LLM` for batches, its streaming `AsyncLLM` for latency."""

    def __init__(self, model: str, dtype: str, engine_args: dict, kv_cache_gib: int | None, streaming: bool):
        self.model, self.dtype, self.engine_args, self.streaming = model, dtype, engine_args, streaming
        self.kv_cache_gib = kv_cache_gib  # vLLM takes it from VLLM_CPU_KVCACHE_SPACE, set by the parent
        self.llm = None

    def start(self) -> None:
        import conveyor

        engine = conveyor.AsyncLLM if self.streaming else conveyor.LLM
        kv = {} if self.kv_cache_gib is None else {"kv_cache_memory": self.kv_cache_gib << 30}
        self.llm = engine(self.model, dtype=self.dtype, **kv, **self.engine_args)

    def dtype_chosen(self) -> str:
        """The dtype the workers run in: resolved here as they resolve it (same environment)."""
        import torch

        from conveyor.config import EngineConfig
        from conveyor.gpu_worker.model_runner import resolve_dtype

        config = EngineConfig(model=self.model, dtype=self.dtype)  # a GGUF file's config is its metadata
        dtype = resolve_dtype(config, config.load_hf_config(), torch.device(config.resolved_device()))
        return str(dtype).removeprefix("torch.")

    def _params(self, output_len: int):
        from conveyor import RequestOutputKind, SamplingParams

        kind = RequestOutputKind.DELTA if self.streaming else RequestOutputKind.FINAL_ONLY
        return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0, output_kind=kind)

    def generate(self, prompts: list[list[int]], output_len: int) -> list[int]:
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], self._params(output_len),
                                    use_tqdm=False)
        return [len(out.outputs[0].token_ids) for out in outputs]

    async def stream(self, prompt: list[int], output_len: int) -> list[float]:
        start, times = time.perf_counter(), []
        async for out in self.llm.generate({"prompt_token_ids": prompt}, self._params(output_len)):
            times += [time.perf_counter() - start] * len(out.outputs[0].token_ids)
        return times

    def spec_stats(self, loop) -> dict:
        """Speculative decoding's counters since start (zero without it)."""
        stats = loop.run_until_complete(self.llm.get_stats())
        return {name: stats.get(name, 0) for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None


class VllmBackend(ConveyorBackend):
    """vLLM's `LLM` for batches, its V1 `AsyncLLM` for latency (run inside `.venv-vllm`)."""

    def start(self) -> None:
        args = dict(model=self.model, dtype=self.dtype, seed=0, **self.engine_args)
        if self.streaming:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        else:
            from vllm import LLM

            self.llm = LLM(**args)

    def spec_stats(self, loop) -> dict:
        return {}

    def dtype_chosen(self) -> str:
        engine = getattr(self.llm, "llm_engine", self.llm)
        return str(getattr(engine, "model_config").dtype).removeprefix("torch.")

    def _params(self, output_len: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.DELTA if self.streaming else RequestOutputKind.FINAL_ONLY
        return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0, output_kind=kind)

    def close(self) -> None:
        # vLLM's offline LLM has no shutdown(): its engine goes with this process (and the parent
        # kills the process group after it).
        if self.llm is not None and hasattr(self.llm, "shutdown"):
            self.llm.shutdown()
        self.llm = None

    async def stream(self, prompt: list[int], output_len: int) -> list[float]:
        start, times = time.perf_counter(), []
        request_id = f"latency-{time.monotonic_ns()}"
        async for out in self.llm.generate({"prompt_token_ids": prompt}, self._params(output_len), request_id):
            times += [time.perf_counter() - start] * len(out.outputs[0].token_ids)
        return times


class _TokenClock:
    """A transformers streamer that stamps each new token (the first `put` is the prompt)."""

    def __init__(self, start: float):
        self.start, self.times, self.seen_prompt = start, [], False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times += [time.perf_counter() - self.start] * value.numel()

    def end(self) -> None:
        pass


class HfBackend:
    """transformers `generate()` in this process: greedy, left-padded batches, exactly N new tokens."""

    def __init__(self, model: str, dtype: str, engine_args: dict, kv_cache_gib: int | None, streaming: bool):
        self.model, self.dtype = model, dtype
        self.batch_size = engine_args.get("max_num_seqs")
        self.hf = None

    def dtype_chosen(self) -> str:
        return str(self.hf.dtype).removeprefix("torch.")

    def start(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        self.hf = AutoModelForCausalLM.from_pretrained(self.model, dtype=dtype).eval()
        config = self.hf.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else self.hf.config.pad_token_id
        self.pad_id = pad if pad is not None else 0

    def _generate(self, prompts: list[list[int]], output_len: int, streamer=None) -> list[int]:
        torch = self.torch
        width = max(len(ids) for ids in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in prompts])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
        with torch.inference_mode():
            out = self.hf.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=output_len, min_new_tokens=output_len,
                                   pad_token_id=self.pad_id, streamer=streamer)
        return [out.shape[1] - width] * len(prompts)

    def generate(self, prompts: list[list[int]], output_len: int) -> list[int]:
        size = self.batch_size or len(prompts)
        counts = []
        for i in range(0, len(prompts), size):
            counts += self._generate(prompts[i:i + size], output_len)
        return counts

    async def stream(self, prompt: list[int], output_len: int) -> list[float]:
        clock = _TokenClock(time.perf_counter())
        self._generate([prompt], output_len, streamer=clock)
        return clock.times

    def close(self) -> None:
        self.hf = None


class LlamaCppBackend:
    """llama-cpp-python's `Llama` on a GGUF file (run inside `.venv-llamacpp`): greedy, exactly
    `output_len` tokens (EOS ignored: `Llama.generate` samples until told to stop). Its API runs one
    sequence at a time, so a throughput batch is its prompts one after another."""

    def __init__(self, model: str, dtype: str, engine_args: dict, kv_cache_gib: int | None, streaming: bool,
                 threads: int | None = None):
        self.model, self.engine_args, self.threads = model, engine_args, threads
        self.llm = None

    def start(self) -> None:
        from llama_cpp import Llama

        kwargs = {"n_threads": self.threads, "n_threads_batch": self.threads} if self.threads else {}
        if self.engine_args.get("max_num_batched_tokens"):
            kwargs["n_batch"] = kwargs["n_ubatch"] = self.engine_args["max_num_batched_tokens"]
        # n_ctx 0: the context the file declares, as the other engines size theirs from the model
        self.llm = Llama(model_path=self.model, n_ctx=self.engine_args.get("max_model_len") or 0, seed=0,
                         verbose=False, **kwargs)

    def dtype_chosen(self) -> str:
        desc = self.llm._model.desc() if hasattr(self.llm._model, "desc") else ""
        return desc.rsplit(" ", 1)[-1] if desc else "gguf"  # "llama ?B Q4_1 ...": the file's weight type

    def _tokens(self, prompt: list[int], output_len: int):
        """Yield `output_len` greedy tokens after `prompt`, from an empty cache each time."""
        self.llm.reset()  # no prefix shared with the previous request, as in the other engines' runs
        count = 0  # generate() rewrites the list it is given: hand it a copy
        for _ in self.llm.generate(list(prompt), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            count += 1
            yield count
            if count == output_len:
                return

    def generate(self, prompts: list[list[int]], output_len: int) -> list[int]:
        return [sum(1 for _ in self._tokens(prompt, output_len)) for prompt in prompts]

    async def stream(self, prompt: list[int], output_len: int) -> list[float]:
        start, times = time.perf_counter(), []
        for _ in self._tokens(prompt, output_len):
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        if self.llm is not None and hasattr(self.llm, "close"):
            self.llm.close()
        self.llm = None


BACKENDS = {"conveyor": ConveyorBackend, "hf": HfBackend, "llamacpp": LlamaCppBackend, "vllm": VllmBackend}


def run_throughput(backend, workload: dict) -> dict:
    output_len = workload["output_len"]
    if workload["warmup"]:
        backend.generate(workload["warmup"], output_len)
    runs = []
    for prompts in workload["runs"]:
        start = time.perf_counter()
        counts = backend.generate(prompts, output_len)
        elapsed = time.perf_counter() - start
        input_tokens, output_tokens = sum(len(p) for p in prompts), sum(counts)
        runs.append({"elapsed_s": elapsed, "num_requests": len(prompts), "input_tokens": input_tokens,
                     "output_tokens": output_tokens, "requests_per_s": len(prompts) / elapsed,
                     "input_tok_per_s": input_tokens / elapsed, "output_tok_per_s": output_tokens / elapsed,
                     "total_tok_per_s": (input_tokens + output_tokens) / elapsed})
    return {"runs": runs}


def run_latency(backend, workload: dict) -> dict:
    output_len = workload["output_len"]
    loop = asyncio.new_event_loop()  # one loop for every request: some engines bind to the first
    try:
        for prompt in workload["warmup"]:
            loop.run_until_complete(backend.stream(prompt, output_len))
        runs = []
        for prompt in workload["runs"]:
            times = loop.run_until_complete(backend.stream(prompt, output_len))
            if not times:
                raise RuntimeError(f"{workload['backend']} streamed no tokens")
            itl = [b - a for a, b in zip(times, times[1:])]
            runs.append({"ttft_s": times[0], "e2e_s": times[-1], "output_tokens": len(times),
                         "tpot_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0,
                         "max_itl_s": max(itl, default=0.0), "median_itl_s": statistics.median(itl or [0.0])})
        spec_stats = getattr(backend, "spec_stats", None)
        return {"runs": runs, **(spec_stats(loop) if spec_stats else {})}
    finally:
        backend.close()  # while the loop is still open: async engines may clean up on it
        loop.close()


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the tool that started it dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: bench_runner.py WORKLOAD.json RESULT.json")
    die_with_parent()
    with open(argv[0]) as f:
        workload = json.load(f)
    mode = workload["mode"]
    if mode not in ("throughput", "latency"):
        sys.exit(f"mode must be throughput or latency, got {mode!r}")
    extra = {"threads": workload["threads"]} if workload.get("threads") else {}
    backend = BACKENDS[workload["backend"]](workload["model"], workload["dtype"], workload["engine_args"],
                                            workload.get("kv_cache_gib"), streaming=mode == "latency", **extra)
    begin = time.perf_counter()
    backend.start()
    result = {"backend": workload["backend"], "mode": mode, "startup_s": time.perf_counter() - begin,
              "process_startup_s": time.perf_counter() - PROCESS_START, "dtype": backend.dtype_chosen(), **extra}
    try:
        result.update(run_throughput(backend, workload) if mode == "throughput" else run_latency(backend, workload))
    finally:
        backend.close()
    with open(argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
