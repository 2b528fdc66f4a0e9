"""Verification of draft tokens (speculative decoding): which drafts the model keeps.

A verifying step computes a request's last known token and its k drafts in one forward and samples
all k + 1 positions, position j as if drafts[:j] were already output: each row gets a sampling
state of its own (`draft_row_states`), so penalties, bad words, min_tokens, no-repeat n-grams and
logits processors see the history that position would have, and its random draw is seeded with
its own position. The drafts kept are the longest run that equals the sampled tokens; the token
sampled after them is kept too.

For a random row this is rejection sampling with a point draft: q puts all its mass on the draft
d, so d is accepted with probability min(1, p(d) / q(d)) = p(d), and a rejected position draws
from the residual max(0, p - q), renormalised: p without d. Sampling t from p with the position's
own seeded draw and accepting d iff t == d gives exactly that (P(t = d) = p(d), and t given
t != d follows the residual), and it keeps the output token for token what the same seed gives
without drafts.
"""

from __future__ import annotations

import dataclasses

from conveyor.gpu_worker.sampler import SamplingState


def draft_row_states(state: SamplingState, drafts: list[int]) -> list[SamplingState]:
    """The sampling states of the len(drafts) + 1 positions a verifying step samples: row j
    sees drafts[:j] after the output. Row 0 is `state` itself; the others rebuild their output
    counts and n-gram tables from their own history (they share the prompt's masks)."""
    rows = [state]
    out = state.output_token_ids
    for j in range(1, len(drafts) + 1):
        rows.append(dataclasses.replace(state, output_token_ids=out + drafts[:j], output_counts=None, num_counted=0,
                                        ngrams=None, ngrams_seen=0, error=None))
    return rows


def num_accepted(drafts: list[int], sampled: list[int]) -> int:
    """How many leading drafts equal the tokens sampled at their positions."""
    a = 0
    while a < len(drafts) and drafts[a] == sampled[a]:
        a += 1
    return a
