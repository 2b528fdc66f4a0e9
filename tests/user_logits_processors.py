"""A user logits processor, imported by path inside the worker processes."""

import torch


def only_token_42(output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    forced = torch.full_like(logits, float("-inf"))
    forced[42] = 0.0
    return forced


def fail_on_third_token(output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    if len(output_token_ids) == 2:
        raise RuntimeError("this processor fails on the third token")
    return logits


def break_the_worker(output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """Makes the worker's next step raise outside any request's processors: a stand-in for a fault
    inside the forward."""
    from conveyor.gpu_worker.model_runner import ModelRunner

    def execute_model(self, step):
        raise RuntimeError("conveyor_test_worker_fault")

    ModelRunner.execute_model = execute_model
    return logits


def ban_the_last_token(output_token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """Depends on the whole history: a verifying step must give each position its own."""
    if output_token_ids:
        logits[output_token_ids[-1]] = float("-inf")
    return logits
