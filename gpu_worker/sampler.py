"""Batched sampler: one call per step over every running request of the batch.

Order (as vLLM V1): the structured-output grammar's mask (`structured_output.py`), then
allowed_token_ids, bad words, logit_bias, min_tokens, no-repeat n-grams, penalties, user logits
processors (`apply_logits_processing`); then greedy rows take the argmax and
random rows go through temperature, top-k, top-p, min-p (`apply_sampling_filters`) and are sampled.
Logprobs come from the raw logits (the model's log-softmax before any of the above).

Random rows are sampled by an exponential race, argmax(probs / q) with q ~ Exp(1): each row draws
its q from its request's generator, seeded for each token from the request's seed and the token's
position (`conveyor/seeds.py`), so its tokens depend neither on its batch neighbours, nor on
preemptions, nor on the rank that samples them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from conveyor.gpu_worker.structured_output import GrammarLoader, accept_tokens, apply_grammars
from conveyor.ipc.messages import Logprobs  # one position: chosen token, rank, top-N
from conveyor.sampling_params import GREEDY_TEMPERATURE, SamplingParams, resolve_logits_processor
from conveyor.seeds import derive_seed

logger = logging.getLogger(__name__)

_LOGPROBS_CHUNK = 512  # rows per log_softmax pass in compute_logprobs (bounds memory for prompts)
_TOP_P_CANDIDATES = 256  # top-p first looks at this many most likely tokens per row

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
PenaltiesFn = Callable[..., object]  # (logits, prompt_mask, output_counts, repetition, presence, frequency)


@dataclass(slots=True)
class SamplingState:
    """One per running request, kept by the worker across steps. The caches below assume that
    `output_token_ids` only grows (they rebuild themselves if it shrinks)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int  # params.seed, or the one the engine core derived for an unseeded request
    generator: torch.Generator | None = None  # random rows only, re-seeded for every token
    processors: list[LogitsProcessor] | None = field(default=None, repr=False)
    prompt_mask: torch.Tensor | None = field(default=None, repr=False)  # [V] bool
    output_counts: torch.Tensor | None = field(default=None, repr=False)  # [V] int32
    num_counted: int = field(default=0, repr=False)
    allowed_mask: torch.Tensor | None = field(default=None, repr=False)  # [V] bool, True = banned
    ngrams: dict[tuple[int, ...], set[int]] | None = field(default=None, repr=False)
    ngrams_seen: int = field(default=0, repr=False)  # sequence length already folded into ngrams
    error: str | None = None  # why this request cannot go on: it fails alone, the batch goes on
    grammar: object | None = field(default=None, repr=False)  # xgrammar's matcher (structured outputs)


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: list[int]
    logprobs: list[Logprobs | None]  # None where params.logprobs is None


def make_sampling_state(params: SamplingParams, prompt_token_ids: list[int],
                        device: torch.device | str, seed: int) -> SamplingState:
    generator = None if params.greedy else torch.Generator(device=device)
    return SamplingState(params, prompt_token_ids, [], seed, generator)


class Sampler:
    def __init__(self, vocab_size: int, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 penalties: PenaltiesFn | None = None, grammars: GrammarLoader | None = None):
        """`argmax` (of each row of a contiguous [S, V] float32 tensor) and `penalties` (the
        contract of `apply_penalties`): the ops' own versions, where they are faster. `grammars`
        loads the compiled grammars of structured outputs."""
        self.vocab_size = vocab_size
        self.argmax = argmax or _argmax
        self.penalties = penalties or apply_penalties
        self.grammars = grammars

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        """`logits` [S, V] float32, row i belonging to states[i]; modified in place."""
        if logits.shape != (len(states), self.vocab_size):
            raise ValueError(f"logits must have shape ({len(states)}, {self.vocab_size}), "
                             f"got {tuple(logits.shape)}")
        params = [st.params for st in states]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        random_rows = [i for i, p in enumerate(params)
                       if p.temperature >= GREEDY_TEMPERATURE and not p.use_beam_search]
        grammar_rows = [i for i, p in enumerate(params) if p.compiled_grammar is not None]
        process = bool(grammar_rows) or any(_needs_processing(p) for p in params)

        raw = None
        if lp_rows:
            if len(lp_rows) < len(states):
                raw = logits[_index(lp_rows, logits.device)]
            else:
                raw = logits.clone() if process or random_rows else logits
        masked = []
        if grammar_rows:
            if self.grammars is None:
                raise ValueError("this sampler has no grammar loader for structured outputs")
            masked = apply_grammars(logits, states, grammar_rows, self.grammars)
        if process:
            apply_logits_processing(logits, states, self.penalties, masked)

        tokens = self.argmax(logits) if len(random_rows) < len(states) else None
        if random_rows:
            idx = None if len(random_rows) == len(states) else _index(random_rows, logits.device)
            sub = logits if idx is None else logits[idx]
            rparams = [params[i] for i in random_rows]
            sub = apply_sampling_filters(sub, *_filter_tensors(rparams, sub.device))
            sampled = _sample(sub, [states[i] for i in random_rows], self.argmax)
            if idx is None:
                tokens = sampled
            else:
                tokens[idx] = sampled
        token_list = tokens.tolist()
        if masked:
            accept_tokens(states, masked, token_list)

        logprobs: list[Logprobs | None] = [None] * len(states)
        if lp_rows:
            entries = compute_logprobs(raw, [token_list[i] for i in lp_rows],
                                       [params[i].logprobs for i in lp_rows])
            for i, entry in zip(lp_rows, entries):
                logprobs[i] = entry
        return SamplerOutput(token_list, logprobs)


def compute_logprobs(logits: torch.Tensor, token_ids: Sequence[int] | torch.Tensor,
                     num_top: int | Sequence[int]) -> list[Logprobs]:
    """Log-softmax of each row of raw `logits` [N, V]: the logprob and rank of `token_ids[i]` and
    the `num_top` (per row, or one for all) most likely tokens. Reusable for prompt logprobs."""
    n = logits.shape[0]
    tops = [num_top] * n if isinstance(num_top, int) else list(num_top)
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=logits.device).view(-1, 1)
    out: list[Logprobs] = []
    for start in range(0, n, _LOGPROBS_CHUNK):
        end = min(start + _LOGPROBS_CHUNK, n)
        lp = torch.log_softmax(logits[start:end].float(), dim=-1)
        chosen = lp.gather(1, ids[start:end])
        ranks = (lp > chosen).sum(dim=-1).add_(1).tolist()
        chosen_list = chosen.view(-1).tolist()
        k = max(tops[start:end])
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        ids_list = ids[start:end].view(-1).tolist()
        for j in range(end - start):
            t = tops[start + j]
            out.append(Logprobs(ids_list[j], chosen_list[j], ranks[j], top_ids[j][:t],
                                     top_lp[j][:t]))
    return out


# -- logits processing (before temperature) ------------------------------------------------------

@dataclass(slots=True)
class _LogitsEdits:
    """What the processors before temperature do to a batch's logits, gathered row by row."""

    allowed_rows: list[int] = field(default_factory=list)  # rows limited to their allowed_token_ids
    ban_rows: list[int] = field(default_factory=list)  # with ban_cols: (row, token) pairs set to -inf
    ban_cols: list[int] = field(default_factory=list)
    bias_rows: list[int] = field(default_factory=list)  # with bias_cols and bias_vals: added to a logit
    bias_cols: list[int] = field(default_factory=list)
    bias_vals: list[float] = field(default_factory=list)
    penalty_rows: list[int] = field(default_factory=list)
    processor_rows: list[int] = field(default_factory=list)  # rows with user logits processors

    def ban(self, row: int, tokens) -> None:
        for t in tokens:
            self.ban_rows.append(row)
            self.ban_cols.append(t)


def _gather_logits_edits(states: list[SamplingState]) -> _LogitsEdits:
    edits = _LogitsEdits()
    for i, st in enumerate(states):
        p = st.params
        out = st.output_token_ids
        if p.allowed_token_ids is not None:
            edits.allowed_rows.append(i)
        if p.bad_words_token_ids:
            for word in p.bad_words_token_ids:
                prefix = len(word) - 1
                if prefix == 0 or (len(out) >= prefix and out[-prefix:] == word[:-1]):
                    edits.ban(i, (word[-1],))
        if p.logit_bias:
            for t, b in p.logit_bias.items():
                edits.bias_rows.append(i)
                edits.bias_cols.append(t)
                edits.bias_vals.append(b)
        if len(out) < p.min_tokens:
            edits.ban(i, p.all_stop_token_ids)
        if p.no_repeat_ngram_size:
            edits.ban(i, _banned_ngram_tokens(st))
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            edits.penalty_rows.append(i)
        if p.logits_processors:
            edits.processor_rows.append(i)
    return edits


def apply_logits_processing(logits: torch.Tensor, states: list[SamplingState],
                            penalties: PenaltiesFn | None = None, masked_rows: Sequence[int] = ()) -> torch.Tensor:
    """Apply every per-request processor that precedes temperature to `logits` [S, V] in place;
    the penalties with `penalties` (default: `apply_penalties`). `masked_rows`: rows a grammar
    has already masked, which fail too if nothing is left."""
    penalties = penalties or apply_penalties
    vocab, device = logits.shape[1], logits.device
    edits = _gather_logits_edits(states)
    allowed_rows, ban_rows, penalty_rows = edits.allowed_rows, edits.ban_rows, edits.penalty_rows
    if allowed_rows:
        masks = torch.stack([_allowed_mask(states[i], vocab, device) for i in allowed_rows])
        _update_rows(logits, allowed_rows, lambda x: x.masked_fill_(masks, float("-inf")))
    if edits.bias_rows:
        logits.index_put_((_index(edits.bias_rows, device), _index(edits.bias_cols, device)),
                          torch.tensor(edits.bias_vals, dtype=logits.dtype, device=device), accumulate=True)
    if ban_rows:
        logits[_index(ban_rows, device), _index(edits.ban_cols, device)] = float("-inf")
    if allowed_rows or masked_rows or len(ban_rows) >= vocab:
        _fail_rows_left_without_tokens(logits, states, allowed_rows, ban_rows, masked_rows)
    if penalty_rows:
        rows = [states[i] for i in penalty_rows]
        prompt_mask = torch.stack([_prompt_mask(st, vocab, device) for st in rows])
        counts = torch.stack([_output_counts(st, vocab, device) for st in rows])
        rep, pres, freq = (torch.tensor([getattr(st.params, name) for st in rows],
                                        dtype=logits.dtype, device=device)
                           for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"))
        _update_rows(logits, penalty_rows,
                     lambda x: penalties(x, prompt_mask, counts, rep, pres, freq))
    for i in edits.processor_rows:
        _apply_user_processors(logits, states[i], i)
    return logits


def _fail_rows_left_without_tokens(logits: torch.Tensor, states: list[SamplingState],
                                   allowed_rows: list[int], ban_rows: list[int], masked_rows: Sequence[int]) -> None:
    """A request whose own constraints ban every token fails, rather than sample a banned one."""
    vocab = logits.shape[1]
    rows = set(allowed_rows) | set(masked_rows) | {i for i, count in Counter(ban_rows).items() if count >= vocab}
    for i in sorted(rows):
        if states[i].error is not None:
            continue
        allowed = states[i].params.allowed_token_ids
        row = logits[i] if allowed is None else logits[i, _index(allowed, logits.device)]
        if bool(torch.isneginf(row).all()):
            states[i].error = ("no token is left to sample: structured_outputs, allowed_token_ids, bad_words, "
                               "min_tokens and no_repeat_ngram_size together ban every one")


def _apply_user_processors(logits: torch.Tensor, st: SamplingState, i: int) -> None:
    """Row `i` through the request's own processors; one that raises fails this request alone."""
    if st.error is not None:
        return
    paths, path = st.params.logits_processors, None
    try:
        if st.processors is None:
            st.processors = []
            for path in paths:
                st.processors.append(resolve_logits_processor(path))
        row = logits[i]
        for path, fn in zip(paths, st.processors):
            row = fn(st.output_token_ids, row)
        logits[i] = row
    except Exception as e:
        logger.warning("logits processor %r failed", path, exc_info=True)
        st.error = f"logits processor {path!r} failed: {type(e).__name__}: {e}"


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition_penalty: torch.Tensor, presence_penalty: torch.Tensor,
                    frequency_penalty: torch.Tensor) -> torch.Tensor:
    """In place. Repetition over prompt and output tokens (divide positive logits, multiply the
    others); presence and frequency over output tokens only (OpenAI's definition)."""
    output_mask = output_counts > 0
    penalty = torch.where(prompt_mask | output_mask, repetition_penalty.unsqueeze(1), 1.0)
    logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))
    logits -= frequency_penalty.unsqueeze(1) * output_counts
    logits -= presence_penalty.unsqueeze(1) * output_mask
    return logits


# -- sampling filters (temperature and after) ----------------------------------------------------

def apply_sampling_filters(logits: torch.Tensor, temperature: torch.Tensor,
                           top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None,
                           min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Divide by `temperature` [R], then top-k [R] (0 = off), top-p [R], min-p [R] (transformers'
    order). A filter given as None is off for every row. May modify `logits` in place."""
    logits = logits.div_(temperature.unsqueeze(1))
    if top_k is not None or top_p is not None:
        logits = top_k_top_p_filter(logits, top_k, top_p)
    if min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill_(probs < threshold, float("-inf"))
    return logits


def top_k_top_p_filter(logits: torch.Tensor, top_k: torch.Tensor | None,
                       top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep each row's `top_k` largest logits (ties kept; 0 = off), then the smallest set whose
    probability reaches `top_p` (1 = off); the rest become -inf. May modify `logits` in place.

    A full-vocabulary sort is slow on CPU, so top-k alone uses `topk`, and top-p first tries the
    few hundred most likely tokens, falling back to the sort only when they hold too little mass.
    """
    vocab = logits.shape[1]
    k = None
    if top_k is not None:
        k = top_k.to(torch.long)
        k = torch.where((k <= 0) | (k > vocab), vocab, k)
    if top_p is None:
        return _top_k_only(logits, k)
    candidates = _TOP_P_CANDIDATES
    while candidates * 4 <= vocab:
        out = _top_k_top_p_candidates(logits, k, top_p, candidates)
        if out is not None:
            return out
        candidates *= 4
    return _top_k_top_p_sort(logits, k, top_p)


def _top_k_only(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[1]
    on = k < vocab
    if not bool(on.any()):
        return logits
    values = logits.topk(int(k[on].max()), dim=-1).values
    kth = values.gather(1, (k.clamp(max=values.shape[1]) - 1).unsqueeze(1))
    kth.masked_fill_(~on.unsqueeze(1), float("-inf"))
    return logits.masked_fill_(logits < kth, float("-inf"))


def _top_k_top_p_candidates(logits: torch.Tensor, k: torch.Tensor | None, top_p: torch.Tensor,
                            candidates: int) -> torch.Tensor | None:
    """Top-k / top-p decided among the `candidates` largest logits of each row; None when some
    row would need more of them."""
    vocab = logits.shape[1]
    k_on = (k < vocab if k is not None
            else torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device))
    if k is not None and bool((k_on & (k > candidates)).any()):
        return None
    values, order = logits.topk(candidates, dim=-1)  # descending
    if k is not None:
        kth = values.gather(1, (k.clamp(max=candidates) - 1).unsqueeze(1))
        # a tie with the kth value outside the candidates would have to be kept too
        if bool((k_on & ((logits >= kth).sum(dim=-1) > candidates)).any()):
            return None
        values.masked_fill_(k_on.unsqueeze(1) & (values < kth), float("-inf"))
    lse = torch.where(k_on, torch.logsumexp(values, dim=-1), torch.logsumexp(logits, dim=-1))
    probs = (values - lse.unsqueeze(1)).exp_()
    mass_before = probs.cumsum(dim=-1).sub_(probs)  # mass of the more likely candidates
    p_on = top_p < 1.0
    if bool((p_on & ~k_on & (mass_before[:, -1] + probs[:, -1] < top_p)).any()):
        return None  # the candidates do not reach top_p: tokens beyond them may be kept
    values.masked_fill_(p_on.unsqueeze(1) & (mass_before >= top_p.unsqueeze(1)), float("-inf"))
    filtered = torch.full_like(logits, float("-inf")).scatter_(1, order, values)
    untouched = ~(k_on | p_on)
    if bool(untouched.any()):
        filtered[untouched] = logits[untouched]
    return filtered


def _top_k_top_p_sort(logits: torch.Tensor, k: torch.Tensor | None,
                      top_p: torch.Tensor) -> torch.Tensor:
    """One ascending sort of the whole vocabulary for both filters (transformers' method)."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if k is not None:
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)
    drop = cumulative <= (1 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def _sample(logits: torch.Tensor, states: list[SamplingState],
            argmax: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Exponential race: argmax(probs / q), q = -log(u) ~ Exp(1) (rand + log is several times
    faster than exponential_ on CPU). Row j draws u from its generator, seeded with
    derive_seed(seed, position of the token it samples)."""
    probs = torch.softmax(logits, dim=-1)
    u = torch.empty_like(probs)
    for j, st in enumerate(states):
        st.generator.manual_seed(derive_seed(st.seed, len(st.output_token_ids)))
        u[j].uniform_(generator=st.generator)
    # u in [0, 1): q > 0 everywhere, and u = 0 gives q = inf, a token that cannot win
    return argmax(probs.div_(u.log_().neg_()))


# -- helpers -------------------------------------------------------------------------------------

def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _needs_processing(p: SamplingParams) -> bool:
    return bool(p.allowed_token_ids is not None or p.bad_words_token_ids or p.logit_bias
                or (p.min_tokens and p.all_stop_token_ids) or p.no_repeat_ngram_size
                or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                or p.logits_processors)


def _filter_tensors(params: list[SamplingParams], device: torch.device):
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = top_p = min_p = None
    if any(p.top_k > 0 for p in params):
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int32, device=device)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
    return temperature, top_k, top_p, min_p


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _update_rows(logits: torch.Tensor, rows: list[int], fn: Callable[[torch.Tensor], object]) -> None:
    """Run the in-place `fn` on `logits[rows]` (the whole tensor when rows are all of it)."""
    if len(rows) == logits.shape[0]:
        fn(logits)
        return
    idx = _index(rows, logits.device)
    sub = logits[idx]
    fn(sub)
    logits[idx] = sub


def _allowed_mask(st: SamplingState, vocab: int, device: torch.device) -> torch.Tensor:
    if st.allowed_mask is None:
        mask = torch.ones(vocab, dtype=torch.bool, device=device)
        mask[_index(st.params.allowed_token_ids, device)] = False
        st.allowed_mask = mask
    return st.allowed_mask


def _prompt_mask(st: SamplingState, vocab: int, device: torch.device) -> torch.Tensor:
    if st.prompt_mask is None:
        mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        if st.prompt_token_ids:
            mask[_index(st.prompt_token_ids, device)] = True
        st.prompt_mask = mask
    return st.prompt_mask


def _output_counts(st: SamplingState, vocab: int, device: torch.device) -> torch.Tensor:
    out = st.output_token_ids
    if st.output_counts is None or len(out) < st.num_counted:
        st.output_counts = torch.zeros(vocab, dtype=torch.int32, device=device)
        st.num_counted = 0
    if len(out) > st.num_counted:
        new = _index(out[st.num_counted:], device)
        st.output_counts.index_add_(0, new, torch.ones_like(new, dtype=torch.int32))
        st.num_counted = len(out)
    return st.output_counts


def _banned_ngram_tokens(st: SamplingState) -> set[int] | tuple[()]:
    """Tokens that would repeat an n-gram of prompt + output (transformers' NoRepeatNGram)."""
    n = st.params.no_repeat_ngram_size
    prompt, out = st.prompt_token_ids, st.output_token_ids
    total = len(prompt) + len(out)
    if st.ngrams is None or total < st.ngrams_seen:
        st.ngrams, st.ngrams_seen = {}, 0
    if total < n:
        return ()
    if total > st.ngrams_seen:
        start = max(st.ngrams_seen - n + 1, 0)  # first n-gram not yet folded in
        seq = _tail(prompt, out, start)
        for j in range(len(seq) - n + 1):
            st.ngrams.setdefault(tuple(seq[j:j + n - 1]), set()).add(seq[j + n - 1])
        st.ngrams_seen = total
    return st.ngrams.get(tuple(_tail(prompt, out, total - n + 1)), ())


def _tail(prompt: list[int], out: list[int], start: int) -> list[int]:
    """(prompt + out)[start:] without copying the prompt."""
    if start >= len(prompt):
        return out[start - len(prompt):]
    return prompt[start:] + out
