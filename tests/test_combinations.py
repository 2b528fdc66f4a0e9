"""Features proven together: one workload through every pair of engine options, each run against
one reference (transformers, float32): of the model itself, or, where the engine quantizes its
weights at load, of the model with those weights dequantized (the values the engine multiplies with).

The workload mixes greedy, seeded and unseeded requests, shared prefixes, a repeated prompt and
priorities, and its prompts hold many times one step's token budget, so prefills batch, chunk and
queue; with LoRA, a third of its requests run under each of two adapters, sharing prefixes with
requests of the base model and of the other adapter, and transformers' reference is peft's
forward under each request's adapter. In every run:
greedy tokens equal transformers' and their logprobs agree; seeded tokens equal those of a plain
engine; every reported logprob of a sampled token is transformers' logprob of that token on the
same sequence. Under structured outputs, constrained requests (a JSON schema, a regex, a choice
list and a grammar, greedy and sampled) join the workload: each output meets its constraint, and
the others stay exact.

A new engine option joins `AXES`; `pairwise_rows` keeps every pair of option values in some run.
"""

import asyncio
import itertools

import pytest
from transformers import AutoConfig

from conveyor import AsyncLLM, LoRARequest, RequestOutputKind, SamplingParams, StructuredOutputsParams
from conveyor.tools.make_tiny_model import make_tiny_model
from constraints import CHOICES, GRAMMAR, REGEXES, assert_meets
from reference import dequantized_model, hf_greedy, hf_sequence_logprobs, make_lora_adapter, make_prompts

AXES = {
    "tensor_parallel_size": (1, 2),
    "scheduling_policy": ("fcfs", "priority"),
    "enable_prefix_caching": (True, False),
    "enable_chunked_prefill": (True, False),
    "async_scheduling": (False, True),
    "preemption": (False, True),  # a KV cache too small for the whole workload at once
    "quantization": (None, "int8"),
    "lora": (False, True),
    "structured_outputs": (False, True),  # constrained requests join the workload
    "speculation": (None, "ngram", "draft_model"),  # drafts verified in the step
}
MAX_TOKENS = 16
MAX_MODEL_LEN = 128
LOGPROB_TOLERANCE = 1e-4
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def pairwise_rows(axes: dict[str, tuple]) -> list[dict]:
    """Few rows of option values in which every pair of values of two options appears together."""
    names = list(axes)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in axes[a] for vb in axes[b]}
    rows = []
    while uncovered:
        def gain(values):
            row = dict(zip(names, values))
            return sum(((a, row[a]), (b, row[b])) in uncovered for a, b in itertools.combinations(names, 2))

        best = dict(zip(names, max(itertools.product(*axes.values()), key=gain)))
        uncovered -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(names, 2)}
        rows.append(best)
    return rows


ROWS = pairwise_rows(AXES)


def row_id(row: dict) -> str:
    return "-".join(f"{name}_{value}" for name, value in row.items())


def engine_options(row: dict, draft_dir: str) -> dict:
    options = {name: value for name, value in row.items()
               if name not in ("preemption", "lora", "structured_outputs", "speculation")}
    if row["lora"]:
        options |= {"enable_lora": True, "max_loras": 2}  # as many running requests as without adapters
    if row["speculation"] == "ngram":
        options["speculative_config"] = NGRAM
    elif row["speculation"] == "draft_model":  # a draft of other weights: many drafts rejected
        options["speculative_config"] = {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": 3}
    # chunked: prompts split across 64-token steps; whole: every prompt (and a preempted request's
    # prompt and output) fits one step
    options["max_num_batched_tokens"] = 64 if row["enable_chunked_prefill"] else MAX_MODEL_LEN
    options["num_kv_blocks"] = 8 if row["preemption"] else 512
    return options


class Workload:
    """Twelve requests: three kinds of sampling, shared prefixes, one prompt sent twice; with
    adapters, requests 3-5 run under the first and 6-8 under the second."""

    def __init__(self, vocab_size: int, adapter_dirs: list[str]):
        prefix = make_prompts(vocab_size, lens=(40,), seed=7)[0]
        tails = make_prompts(vocab_size, lens=(1, 9, 17, 30, 3, 26, 60, 1, 45, 12), seed=8)
        self.prompts = [prefix + tail for tail in tails[:6]] + tails[6:] + [prefix + tails[1]] * 2
        self.kinds = ["greedy", "seeded", "unseeded"] * 4
        self.priorities = [i % 3 for i in range(len(self.prompts))]
        self.adapter_dirs = adapter_dirs

    def adapters(self, lora: bool) -> list[str | None]:
        """Each request's adapter directory (None: the base model)."""
        return [([None] + self.adapter_dirs)[i // 3 % 3] if lora else None for i in range(len(self.prompts))]

    def params(self, i: int) -> SamplingParams:
        kind = self.kinds[i]
        return SamplingParams(temperature=0.0 if kind == "greedy" else 1.0,
                              seed=1000 + i if kind == "seeded" else None,
                              max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)

    async def run(self, llm: AsyncLLM, lora: bool, constrained: bool = False):
        adapters = self.adapters(lora)

        async def one(i):
            request = None if adapters[i] is None else LoRARequest(f"a{i // 3}", i // 3 % 3, adapters[i])
            async for out in llm.generate({"prompt_token_ids": self.prompts[i]}, self.params(i),
                                          priority=self.priorities[i], lora_request=request):
                pass
            completion = out.outputs[0]
            return completion.token_ids, [lps[t].logprob for t, lps in zip(completion.token_ids, completion.logprobs)]

        async def constrained_one(i, constraint):
            params = SamplingParams(temperature=float(i % 2), seed=i, max_tokens=CONSTRAINED_MAX_TOKENS,
                                    structured_outputs=constraint, output_kind=RequestOutputKind.DELTA)
            text = ""
            async for out in llm.generate(self.prompts[i][:5], params, priority=i % 3):
                text += out.outputs[0].text
            assert out.outputs[0].finish_reason == "stop", (constraint, text)
            assert_meets(constraint, text)

        checks = [constrained_one(i, c) for i, c in enumerate(CONSTRAINTS)] if constrained else []
        results = await asyncio.gather(*(one(i) for i in range(len(self.prompts))), *checks)
        return results[:len(self.prompts)]


CONSTRAINED_MAX_TOKENS = 48
CONSTRAINTS = [StructuredOutputsParams(json={"type": "object", "required": ["size", "ok"], "properties": {
                   "size": {"type": "integer", "minimum": 1, "maximum": 99}, "ok": {"type": "boolean"},
                   "tag": {"enum": ["a", "b"]}}}),
               StructuredOutputsParams(regex=REGEXES[0]), StructuredOutputsParams(choice=CHOICES[1]),
               StructuredOutputsParams(grammar=GRAMMAR)]


@pytest.fixture(scope="module")
def workload(llama_dir, tmp_path_factory) -> Workload:
    root = tmp_path_factory.mktemp("adapters")
    adapter_dirs = [make_lora_adapter(llama_dir, root / "qkvo", 8, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=1),
                    make_lora_adapter(llama_dir, root / "mlp", 4, ["gate_proj", "up_proj", "down_proj"], seed=2,
                                      use_rslora=True)]
    return Workload(AutoConfig.from_pretrained(llama_dir).vocab_size, adapter_dirs)


@pytest.fixture(scope="module")
def reference_dirs(llama_dir, tmp_path_factory) -> dict:
    """quantization -> the model transformers runs as the reference."""
    dirs = {None: llama_dir}
    for quantization in AXES["quantization"][1:]:
        dirs[quantization] = dequantized_model(llama_dir, tmp_path_factory.mktemp(f"llama-{quantization}"),
                                               quantization)
    return dirs


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> str:
    """The tiny llama's shape and vocabulary with other random weights."""
    return str(make_tiny_model(tmp_path_factory.mktemp("draft"), "llama", seed=1))


@pytest.fixture(scope="module")
def greedy_reference(reference_dirs, workload) -> dict:
    """(quantization, lora) -> request index -> transformers' greedy tokens (peft's, under an adapter)."""
    references = {}
    for quantization, path in reference_dirs.items():
        base = [tokens for tokens, _ in hf_greedy(path, workload.prompts, MAX_TOKENS)]
        references[quantization, False] = dict(enumerate(base))
        adapters = workload.adapters(True)
        tokens = references[quantization, True] = {i: base[i] for i, a in enumerate(adapters) if a is None}
        for adapter in set(adapters) - {None}:
            indices = [i for i, a in enumerate(adapters) if a == adapter]
            results = hf_greedy(path, [workload.prompts[i] for i in indices], MAX_TOKENS, adapter=adapter)
            tokens.update({i: result[0] for i, result in zip(indices, results)})
    return references


@pytest.fixture(scope="module")
def seeded_reference(llama_dir, workload) -> dict:
    """(quantization, lora) -> a plain engine's seeded tokens: one process, default options (LoRA on,
    which the base model's requests do not notice), room for everything, every adapter in one step."""
    async def run(quantization):  # a seeded request's tokens depend on nothing else: one engine serves both
        async with AsyncLLM(llama_dir, dtype="float32", num_kv_blocks=512, max_model_len=MAX_MODEL_LEN,
                            quantization=quantization, enable_lora=True, max_loras=2) as llm:
            return [await workload.run(llm, lora) for lora in AXES["lora"]]

    references = {}
    for quantization in AXES["quantization"]:
        for lora, results in zip(AXES["lora"], asyncio.run(run(quantization))):
            references[quantization, lora] = {i: tokens for i, (tokens, _) in enumerate(results)
                                              if workload.kinds[i] == "seeded"}
    return references


def test_every_pair_of_options_runs_together():
    for a, b in itertools.combinations(AXES, 2):
        seen = {(row[a], row[b]) for row in ROWS}
        assert seen == set(itertools.product(AXES[a], AXES[b])), (a, b)


@pytest.mark.parametrize("row", ROWS, ids=row_id)
async def test_workload_is_exact_under(row, llama_dir, workload, reference_dirs, greedy_reference,
                                       seeded_reference, draft_dir):
    async with AsyncLLM(llama_dir, dtype="float32", max_model_len=MAX_MODEL_LEN,
                        **engine_options(row, draft_dir)) as llm:
        results = await workload.run(llm, row["lora"], row["structured_outputs"])
        stats = await llm.get_stats()
    assert (stats["num_preemptions"] > 0) == row["preemption"]
    assert (stats.get("num_draft_tokens", 0) > 0) == (row["speculation"] is not None)

    tokens = [t for t, _ in results]
    quantization, lora = row["quantization"], row["lora"]
    transformers_logprobs = hf_sequence_logprobs(reference_dirs[quantization], workload.prompts, tokens,
                                                 workload.adapters(lora))
    for i, (got_tokens, got_logprobs) in enumerate(results):
        kind = workload.kinds[i]
        if kind == "greedy":
            assert got_tokens == greedy_reference[quantization, lora][i], f"request {i}"
        if kind == "seeded":
            assert got_tokens == seeded_reference[quantization, lora][i], f"request {i}"
        assert got_logprobs == pytest.approx(transformers_logprobs[i], abs=LOGPROB_TOLERANCE), f"request {i}"
