"""Input checks shared by the kernel wrappers: a wrong layout raises ValueError naming the argument.

Wrappers never copy an input to fix its layout; they say what was expected instead.
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

HALF_OR_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None,
    shape: tuple[int | None, ...] | None = None,
    contiguous: bool = False,
) -> None:
    """Raise ValueError unless `t` has the given rank, dtype and shape (None = any size there),
    its last dimension is dense (stride 1), and, with `contiguous`, it is fully contiguous."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if dtype is not None:
        allowed_dtypes = (dtype,) if isinstance(dtype, torch.dtype) else dtype
        if t.dtype not in allowed_dtypes:
            raise ValueError(f"{name} must have dtype {' or '.join(map(str, allowed_dtypes))}, got {t.dtype}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    if t.numel() > 0 and t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_same_device(kernel, **tensors: torch.Tensor | None) -> None:
    """All tensors on one device, and a CPU device only when the Triton interpreter is active."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}")
    if first.type == "cpu" and not is_interpreted(kernel):
        raise ValueError(
            "Triton kernels need CUDA tensors; CPU tensors are only accepted when TRITON_INTERPRET=1 was set "
            "before the kernel module was imported (use the *_ref function on CPU)"
        )


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return isinstance(kernel, InterpretedFunction)
