"""Draft tokens for speculative decoding: what a request's next tokens probably are.

In this order: the caller's `SamplingParams.draft_token_ids` (while the output so far follows
them); the n-gram proposer (prompt lookup: the tokens that followed the latest earlier occurrence
of the sequence's last n tokens), which needs token ids alone and so runs here in the engine core
where they live; or the draft model's proposals, made in the workers and sent back with each
result (`Request.spec_token_ids`). The workers verify the drafts; a wrong one costs a slot in the
step, never a token.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from conveyor.config import SpeculativeConfig

if TYPE_CHECKING:
    from conveyor.engine_core.request import Request


class Proposer:
    """The engine's proposer (`speculative_config`, or None) and the caller's drafts."""

    def __init__(self, config: SpeculativeConfig | None):
        self.ngram = NgramProposer(config) if config is not None and config.method == "ngram" else None
        self.draft_model = config is not None and config.method == "draft_model"
        # slots a sampling step needs past its tokens for the draft model's k proposals
        self.draft_slots = config.num_speculative_tokens if self.draft_model else 0

    def speculates(self, request: Request) -> bool:
        """Whether the request's next step may carry drafts (it then never has two in flight). Not
        under structured outputs: a worker's grammar matcher follows the request token by token."""
        if request.sampling_params.structured_outputs is not None:
            return False
        drafts = request.sampling_params.draft_token_ids
        return (self.ngram is not None or self.draft_model
                or drafts is not None and request.num_output_tokens < len(drafts))

    def propose(self, request: Request, limit: int) -> list[int]:
        """Up to `limit` drafts for the tokens after the request's last one (known: none in flight)."""
        draft = caller_drafts(request)
        if not draft and self.ngram is not None:
            return self.ngram.propose(request.all_token_ids, limit)
        if not draft and self.draft_model:
            draft = request.spec_token_ids
        return draft[:limit]


class NgramProposer:
    def __init__(self, config: SpeculativeConfig):
        self.k = config.num_speculative_tokens
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, token_ids: list[int], limit: int) -> list[int]:
        """Up to min(k, limit) tokens that followed the latest earlier occurrence of the longest
        suffix of `token_ids` of min_n..max_n tokens; [] where none occurs."""
        limit = min(limit, self.k)
        num_tokens = len(token_ids)
        if limit <= 0 or num_tokens <= self.min_n:
            return []
        # bytes.rfind runs in C; token ids fit int32 (SamplingParams and the vocabulary bound them)
        data = array("i", token_ids).tobytes()
        searched = 4 * (num_tokens - 1)  # an occurrence must be followed by a token it predicts
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            pattern = data[-4 * n:]
            end = searched
            while (pos := data.rfind(pattern, 0, end)) != -1:
                if pos % 4 == 0:
                    start = pos // 4 + n
                    return token_ids[start:start + limit]
                end = pos + len(pattern) - 1  # a match across token boundaries: look further back
        return []


def caller_drafts(request: Request) -> list[int]:
    """The caller's draft tokens not yet verified, while the output so far equals their start."""
    drafts = request.sampling_params.draft_token_ids
    out = request.output_token_ids
    if not drafts or len(out) >= len(drafts) or drafts[:len(out)] != out:
        return []
    return drafts[len(out):]
