"""Structured outputs on a worker rank: each constrained request's grammar matcher, the token
bitmask it fills for every step that samples, and the masking of the logits.

Every rank keeps its own matchers: ranks sample identical tokens, so their matchers agree without
a word between them, and a rank knows its token the moment it samples it, which async scheduling
needs (the step after is already running when the core hears of the token). A matcher is made at
the request's first sample and replays the output so far, so a preempted request resumes where
it was. The grammar arrives compiled (`SamplingParams.compiled_grammar`, by the frontend); it is
loaded once per rank and kept, against xgrammar's view of the tokenizer, which the frontend sends
once (with a step, before any step that samples for its constrained requests): a rank never loads
the tokenizer itself (seconds for a GGUF file), so no step waits for it.

xgrammar's JSON strings admit raw control characters (U+0000-U+001F but CR and LF), which JSON
forbids and strict parsers (Python's json among them) refuse; JSON is compiled without free
whitespace, so no token holding a byte below 0x20 belongs in it anywhere, and JSON rows also ban
those tokens (`control_free_mask`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

SamplingState = Any  # gpu_worker/sampler.py's, which imports this module

CACHE_SIZE = 64  # loaded grammars kept per rank, least recently used dropped first


class GrammarLoader:
    """Loads compiled grammars for the tokenizer set last (`set_tokenizer`)."""

    def __init__(self):
        self._tokenizer_json: str | None = None
        self._info = None
        self._error: str | None = None
        self._grammars: OrderedDict[str, object] = OrderedDict()
        self._control_free: torch.Tensor | None = None

    def set_tokenizer(self, info_json: str) -> None:
        """xgrammar's serialized TokenizerInfo, as a frontend built it."""
        if info_json != self._tokenizer_json:
            import xgrammar

            self._tokenizer_json, self._info, self._error = info_json, None, None
            self._grammars.clear()
            self._control_free = None
            try:  # a bad one fails the constrained requests, not the rank
                self._info = xgrammar.TokenizerInfo.deserialize_json(info_json)
            except Exception as e:
                self._error = f"{type(e).__name__}: {e}"

    def load(self, compiled: str):
        """The grammar of `compiled` (xgrammar's serialized CompiledGrammar)."""
        grammar = self._grammars.get(compiled)
        if grammar is not None:
            self._grammars.move_to_end(compiled)
            return grammar
        import xgrammar

        if self._info is None:
            raise RuntimeError(f"the tokenizer's grammar view {'never arrived' if self._error is None else 'is bad'}"
                               + (f": {self._error}" if self._error else ""))
        grammar = self._grammars[compiled] = xgrammar.CompiledGrammar.deserialize_json(compiled, self._info)
        while len(self._grammars) > CACHE_SIZE:
            self._grammars.popitem(last=False)
        return grammar


    def control_free_mask(self, num_words: int) -> torch.Tensor:
        """[num_words] int32 bitmask: the tokens whose text holds no byte below 0x20 (and any beyond
        the tokenizer's vocabulary, which grammars ban anyway)."""
        if self._control_free is None:
            bits = np.ones(num_words * 32, dtype=bool)
            for token_id, text in enumerate(self._info.decoded_vocab):
                if any(b < 0x20 for b in text):
                    bits[token_id] = False
            words = np.packbits(bits, bitorder="little").view("<i4")  # token t: bit t % 32 of word t // 32
            self._control_free = torch.from_numpy(words.astype(np.int32))
        return self._control_free


def _is_json(params) -> bool:
    constraint = params.structured_outputs
    return constraint is not None and (constraint.json is not None or bool(constraint.json_object))


def make_matcher(loader: GrammarLoader, st: SamplingState):
    """A matcher for the request of `st`, advanced over its output so far; its stop tokens are the
    request's (the end of the grammar is one of them, so the request stops as it would)."""
    import xgrammar

    params = st.params
    stops = list(params.all_stop_token_ids)
    if not stops and params.eos_token_id is not None:
        stops = [params.eos_token_id]  # ignore_eos: the grammar still ends with it
    matcher = xgrammar.GrammarMatcher(loader.load(params.compiled_grammar), override_stop_tokens=stops or None,
                                      terminate_without_stop_token=not stops)
    for token in st.output_token_ids:
        if not matcher.accept_token(token):
            raise RuntimeError(f"the output so far breaks the grammar at token {token}")
    return matcher


def apply_grammars(logits: torch.Tensor, states: list[SamplingState], rows: list[int],
                   loader: GrammarLoader) -> list[int]:
    """Ban at each row of `rows` every token its grammar does not allow next, in place; returns
    the rows masked (a request whose grammar already ended, or that failed, is left alone)."""
    import xgrammar

    masked = []
    bitmask = None
    for i in rows:
        st = states[i]
        if st.error is not None:
            continue
        if st.grammar is None:
            try:
                st.grammar = make_matcher(loader, st)
            except Exception as e:
                st.error = f"structured_outputs: {e}"
                continue
        if st.grammar.is_terminated():
            continue  # the core stops it with this step's result: its token here is dropped
        if bitmask is None:
            bitmask = xgrammar.allocate_token_bitmask(logits.shape[0], logits.shape[1])
        st.grammar.fill_next_token_bitmask(bitmask, i)
        if _is_json(st.params):
            bitmask[i] &= loader.control_free_mask(bitmask.shape[1])
        masked.append(i)
    if masked:
        if logits.device.type == "cpu":
            xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=masked)
        else:
            apply_token_bitmask(logits, bitmask.to(logits.device, non_blocking=True), masked)
    return masked


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In torch, on any device: logits[i, t] = -inf where bit t of bitmask[i] (int32 words, the
    lowest bit first) is 0, for i in `rows`."""
    vocab = logits.shape[1]
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[index].unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()
    sub = logits[index]
    sub.masked_fill_(~allowed, float("-inf"))
    logits[index] = sub


def accept_tokens(states: list[SamplingState], rows: list[int], tokens: list[int]) -> None:
    """Advance each row's matcher over the token it sampled."""
    for i in rows:
        st = states[i]
        if st.error is None and not st.grammar.accept_token(tokens[i]):
            st.error = f"structured_outputs: the sampled token {tokens[i]} breaks the grammar"
