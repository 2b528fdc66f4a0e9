"""A user logits processor, imported by path inside the worker processes."""

import torch


def only_token_42(output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    forced = torch.full_like(logits, float("-inf"))
    forced[42] = 0.0
    return forced
