"""Runs the model on one rank: persistent per-request state, step inputs, forward, sampling."""

import logging
from dataclasses import dataclass

import numpy as np
import torch

from conveyor.config import EngineConfig, resolve_max_model_len
from conveyor.gguf_metadata import hf_config_of, open_gguf
from conveyor.gpu_worker.attention import AttentionMetadata
from conveyor.gpu_worker.lora import LoRAManager
from conveyor.gpu_worker.draft_model import DraftModel
from conveyor.gpu_worker.model_loader import load_model
from conveyor.gpu_worker.ops import select_ops
from conveyor.gpu_worker.rejection_sampler import draft_row_states, num_accepted
from conveyor.gpu_worker.sampler import Sampler, SamplingState, compute_logprobs, make_sampling_state
from conveyor.gpu_worker.structured_output import GrammarLoader
from conveyor.ipc.messages import EmbeddingTable, Logprobs, ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_CACHE_MEMORY = 2 << 30


def resolve_dtype(config: EngineConfig, hf_config, device: torch.device) -> torch.dtype:
    """The dtype asked for, or for `auto` the checkpoint's, except that a CPU computes in the
    dtype it multiplies fastest (kernels/cpu/features.py)."""
    if config.dtype == "auto":
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    else:
        dtype = DTYPES[config.dtype]
    if device.type != "cpu":
        return dtype
    from conveyor.kernels.cpu import features

    return features.resolve_cpu_dtype(config.dtype, dtype, features.detect())


def embedding_tensor(table: EmbeddingTable, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A prompt-tuning table's rows as the model's embeddings (checked by the core: `problem`)."""
    raw = torch.frombuffer(bytearray(table.data), dtype=torch.uint8)
    return raw.view(getattr(torch, table.dtype)).view(table.shape).to(device, dtype)


@dataclass(slots=True)
class CachedRequestState:
    request_id: str
    token_ids: list[int]  # prompt, then every sampled token
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingState
    num_prompt_tokens: int
    prompt_logprobs: list[Logprobs | None] | None = None  # collected chunk by chunk until sampled
    lora_id: int = 0
    embedding_table: torch.Tensor | None = None  # prompt tuning: rows of the ids >= the vocabulary


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device | None = None):
        self.config = config
        self.device = device or torch.device(config.resolved_device())
        gguf = open_gguf(config.gguf_path) if config.gguf_file else None  # parsed once: config and weights
        self.hf_config = hf_config_of(gguf) if gguf else config.load_hf_config()
        self.max_model_len = resolve_max_model_len(config, self.hf_config)  # a bad one fails before loading
        self.dtype = resolve_dtype(config, self.hf_config, self.device)
        self.ops = select_ops(self.device, self.dtype, config.attention_backend)
        self.model = load_model(config.model, self.hf_config, self.dtype, self.device, self.ops, gguf,
                                config.quantization)
        self.block_size = config.block_size
        self.sampler = Sampler(self.hf_config.vocab_size, self.ops.argmax, self.ops.penalties, GrammarLoader())
        self.requests: dict[str, CachedRequestState] = {}
        self.lora = LoRAManager(self.model, self.dtype, self.device, self.ops) if config.enable_lora else None
        self.kv_cache: torch.Tensor | None = None
        self.kv_caches: list[torch.Tensor] = []
        spec = config.speculative_config
        self.drafter = None
        if spec is not None and spec.method == "draft_model":
            self.drafter = DraftModel(config, self.hf_config, self.dtype, self.device, self.ops)

    # ---- KV cache ----

    def kv_block_bytes(self) -> int:
        """Of the target's cache and, with a draft model, of the draft's, which shares its blocks."""
        attn = self.model.model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize
        draft = self.drafter.kv_block_bytes() if self.drafter is not None else 0
        return per_token * self.block_size * self.hf_config.num_hidden_layers + draft

    def determine_num_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.85)
            else:  # no more than every sequence at its longest needs
                blocks_per_seq = -(-self.max_model_len // self.block_size)
                budget = min(DEFAULT_CPU_KV_CACHE_MEMORY,
                             self.config.max_num_seqs * blocks_per_seq * self.kv_block_bytes())
        return max(1, budget // self.kv_block_bytes())

    def init_kv_cache(self, num_blocks: int) -> None:
        attn = self.model.model.layers[0].self_attn
        shape = (self.hf_config.num_hidden_layers, 2, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        # Zeroed: padded attention reads of unused slots must meet finite values.
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_caches = list(self.kv_cache.unbind(0))
        if self.drafter is not None:
            self.drafter.init_kv_cache(num_blocks)

    # ---- one step ----

    def update_states(self, step: SchedulerOutput) -> None:
        for request_id in step.finished_request_ids:
            self.requests.pop(request_id, None)
        for lora_id in step.lora_evictions:
            self.lora.evict(lora_id)
        for lora_id, path in step.lora_loads.items():
            self.lora.load(lora_id, path)
        if step.grammar_tokenizer is not None:
            self.sampler.grammars.set_tokenizer(step.grammar_tokenizer)
        vocab = self.hf_config.vocab_size
        for request_id, num_blocks in step.trimmed_blocks.items():  # before the new ones, which may re-add it
            if (state := self.requests.get(request_id)) is not None:
                del state.block_ids[num_blocks:]
        for new in step.new_requests:
            table = new.prompt_embedding_table
            real_prompt = new.prompt_token_ids if table is None else [t for t in new.prompt_token_ids if t < vocab]
            sampling = make_sampling_state(new.sampling_params, real_prompt, self.device, new.sampling_seed)
            sampling.output_token_ids.extend(new.output_token_ids)
            self.requests[new.request_id] = CachedRequestState(
                new.request_id,
                new.prompt_token_ids + new.output_token_ids,
                list(new.block_ids),
                new.num_computed_tokens,
                sampling,
                len(new.prompt_token_ids),
                # the first prompt token has no logprob; a resumed request already sent them
                [None] if new.sampling_params.prompt_logprobs is not None and not new.output_token_ids else None,
                new.lora_id,
                None if table is None else embedding_tensor(table, self.dtype, self.device),
            )
        cached = step.cached_requests
        for request_id, new_block_ids, num_computed in zip(cached.request_ids, cached.new_block_ids,
                                                           cached.num_computed_tokens):
            state = self.requests[request_id]
            if new_block_ids:
                state.block_ids.extend(new_block_ids)
            state.num_computed_tokens = num_computed

    def execute_model(self, step: SchedulerOutput) -> ModelRunnerOutput:
        """One step. The caller holds torch.inference_mode() (the worker enters it once, which
        costs less than entering it every step) and times the call (`model_time`)."""
        self.update_states(step)
        if not step.num_scheduled_tokens:
            return ModelRunnerOutput(step.step_id, [], [])
        # Decodes first, then prefills by length: the attention path batches equal neighbours.
        order = sorted(zip(step.scheduled_request_ids(), step.num_scheduled_tokens),
                       key=lambda item: (item[1] != 1, item[1]))
        states = [self.requests[request_id] for request_id, _ in order]
        num_tokens = [n for _, n in order]
        drafts = step.draft_token_ids
        input_ids, positions, meta, logits_indices, sampling_states, virtual = self.prepare_inputs(
            states, num_tokens, drafts)
        if self.lora is not None:
            self.lora.batch.prepare([s.lora_id for s in states], num_tokens)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, virtual)
        if self.drafter is not None:
            self.drafter.run(input_ids, positions, meta)
        self.collect_prompt_logprobs(hidden, states, num_tokens)
        sampled_ids: list[list[int]] = []
        request_ids: list[str] = []
        logprobs = None
        errors = {}
        grammar_ended = []
        if logits_indices:
            logits = self.model.compute_logits(hidden[torch.tensor(logits_indices, device=self.device)])
            rows = [s.sampling for s in sampling_states]
            if drafts:  # one row per position a verifying request samples
                rows = [row for s in sampling_states
                        for row in (draft_row_states(s.sampling, drafts[s.request_id])
                                    if s.request_id in drafts else (s.sampling,))]
            out = self.sampler(logits, rows)
            sampled_logprobs = []
            r = 0
            for state in sampling_states:
                draft = drafts.get(state.request_id, ()) if drafts else ()
                sampled = out.sampled_token_ids[r : r + len(draft) + 1]
                kept = num_accepted(draft, sampled) + 1 if draft else 1
                tokens = sampled[:kept]
                # kept even by a request that failed: a step scheduled meanwhile computes its position
                state.token_ids.extend(tokens)
                state.sampling.output_token_ids.extend(tokens)
                error = next((row.error for row in rows[r : r + kept] if row.error is not None), None)
                lps = out.logprobs[r : r + kept]
                r += len(draft) + 1
                if error is not None:
                    state.sampling.error = errors[state.request_id] = error
                    continue
                if state.lora_id and state.lora_id in self.lora.failed:
                    errors[state.request_id] = self.lora.failed[state.lora_id]
                    continue
                request_ids.append(state.request_id)
                sampled_ids.append(tokens)
                sampled_logprobs.append(lps if lps[0] is not None else None)
                if state.sampling.grammar is not None and state.sampling.grammar.is_terminated():
                    grammar_ended.append(state.request_id)
            if any(lp is not None for lp in sampled_logprobs):
                logprobs = sampled_logprobs
        proposals = None
        if self.drafter is not None and request_ids:
            kept = [self.requests[request_id] for request_id in request_ids]
            proposals = dict(zip(request_ids, self.drafter.propose(
                [s.token_ids[-1] for s in kept], [len(s.token_ids) - 1 for s in kept], [s.block_ids for s in kept])))
        prompt_logprobs = {}
        for state in sampling_states:
            if state.prompt_logprobs is not None:
                prompt_logprobs[state.request_id], state.prompt_logprobs = state.prompt_logprobs, None
        return ModelRunnerOutput(step.step_id, request_ids, sampled_ids, logprobs, prompt_logprobs or None,
                                 errors=errors or None, grammar_ended=grammar_ended or None,
                                 draft_token_ids=proposals)

    def collect_prompt_logprobs(self, hidden, states, num_tokens) -> None:
        """For requests that asked for prompt logprobs: the logprob of each prompt token given the
        ones before it, from this step's chunk of the prompt."""
        start = 0
        for state, n in zip(states, num_tokens):
            if state.prompt_logprobs is not None:
                first = state.num_computed_tokens  # position of the chunk's first token
                last = min(first + n, state.num_prompt_tokens - 1)  # predicts positions first+1 .. last
                if last > first:
                    logits = self.model.compute_logits(hidden[start : start + last - first])
                    targets = state.token_ids[first + 1 : last + 1]
                    num_top = state.sampling.params.prompt_logprobs
                    state.prompt_logprobs += compute_logprobs(logits, targets, num_top)
            start += n

    def prepare_inputs(self, states: list[CachedRequestState], num_tokens: list[int],
                       drafts: dict[str, list[int]] | None = None):
        """The step's flattened batch. A request's tokens are its known ones from
        num_computed_tokens on, then its `drafts` (counted in `num_tokens`); one that reaches the
        end of its known tokens samples there and after each draft."""
        bs = self.block_size
        counts = np.array(num_tokens, dtype=np.int64)
        starts = np.array([s.num_computed_tokens for s in states], dtype=np.int64)
        seq_lens = starts + counts
        total = int(counts.sum())
        query_start_loc = np.zeros(len(states) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        # position of every token: its request's start plus its offset within the request's query
        offsets = np.arange(total, dtype=np.int64) - np.repeat(query_start_loc[:-1], counts)
        positions = np.repeat(starts, counts) + offsets
        input_ids = np.empty(total, dtype=np.int64)
        max_blocks = max(len(s.block_ids) for s in states)
        block_tables = np.zeros((len(states), max_blocks), dtype=np.int32)
        logits_indices, sampling_states, tabled = [], [], []
        q0 = 0  # plain ints in this loop: numpy scalars cost more than the work
        for i, (state, n) in enumerate(zip(states, num_tokens)):
            start, token_ids = state.num_computed_tokens, state.token_ids
            draft = drafts.get(state.request_id, ()) if drafts else ()
            known = n - len(draft)
            if n == 1:
                input_ids[q0] = token_ids[start]
            else:
                input_ids[q0 : q0 + known] = token_ids[start : start + known]
                input_ids[q0 + known : q0 + n] = draft
            block_tables[i, : len(state.block_ids)] = state.block_ids
            if state.embedding_table is not None and start < state.num_prompt_tokens:
                tabled.append((state, q0, n))
            q0 += n
            if start + known >= len(token_ids):  # reaches the end of what is known: sample
                logits_indices.extend(range(q0 - len(draft) - 1, q0))
                sampling_states.append(state)
        row = np.repeat(np.arange(len(states)), counts)
        slot_mapping = block_tables[row, positions // bs].astype(np.int64) * bs + positions % bs
        num_decodes = int(np.argmax(counts != 1)) if (counts != 1).any() else len(states)
        to = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)  # noqa: E731
        meta = AttentionMetadata(
            slot_mapping=to(slot_mapping),
            query_start_loc=to(query_start_loc.astype(np.int32)),
            seq_lens=to(seq_lens.astype(np.int32)),
            block_tables=to(block_tables),
            max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()),
            num_decodes=num_decodes,
            query_lens_cpu=num_tokens,
            seq_lens_cpu=seq_lens.tolist(),
        )
        virtual = self.virtual_embeddings(input_ids, tabled)
        return to(input_ids), to(positions), meta, logits_indices, sampling_states, virtual

    def virtual_embeddings(self, input_ids: np.ndarray, tabled) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prompt tuning: the step's tokens whose ids index their request's table (ids past the
        vocabulary), as (token indices, table rows); their ids in `input_ids` become 0 for the lookup."""
        vocab = self.hf_config.vocab_size
        indices, rows = [], []
        for state, q0, n in tabled:
            ids = input_ids[q0:q0 + n]
            found = np.flatnonzero(ids >= vocab)
            if len(found):
                indices.append(torch.from_numpy(found + q0))
                rows.append(state.embedding_table[torch.from_numpy(ids[found] - vocab)])
                ids[found] = 0
        if not indices:
            return None
        return torch.cat(indices).to(self.device), torch.cat(rows)
