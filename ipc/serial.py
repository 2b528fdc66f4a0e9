"""msgpack encoding of the message Structs, with tensors carried as raw side frames.

`encode` returns a list of frames: the msgpack body first, then one buffer per tensor, which
zmq sends without copying. Nothing here pickles, and nothing imports torch until a tensor crosses
(the engine-core process never needs it).
"""

import math
from typing import Any

import msgspec
import numpy as np

TENSOR_EXT = 1


class Encoder:
    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._frames: list[Any] = []

    def encode(self, obj: Any) -> list[Any]:
        self._frames = [b""]
        try:
            self._frames[0] = self._encoder.encode(obj)
            return self._frames
        finally:
            self._frames = []

    def _enc_hook(self, obj: Any) -> Any:
        if type(obj).__module__ == "torch" and type(obj).__name__ in ("Tensor", "Parameter"):
            import torch  # only processes that send tensors pay for importing torch

            array = obj.detach().cpu().contiguous()
            dtype = str(array.dtype).removeprefix("torch.")
            self._frames.append(array.view(torch.uint8).numpy().data if array.numel() else b"")
            meta = msgspec.msgpack.encode((dtype, list(array.shape), len(self._frames) - 1))
            return msgspec.msgpack.Ext(TENSOR_EXT, meta)
        raise TypeError(f"cannot encode {type(obj).__name__} for IPC")


class Decoder:
    """Decodes `type_` from frames. Anything malformed (garbage, a truncated body, wrong types, a
    tensor whose side frame is missing or does not fit its shape) raises `msgspec.DecodeError`.
    With `tensors=False` a tensor is malformed too: a process that never receives
    one (the engine core) neither imports torch for one nor holds its memory."""

    def __init__(self, type_: Any = Any, tensors: bool = True) -> None:
        self._decoder = msgspec.msgpack.Decoder(type_, ext_hook=self._ext_hook if tensors else _no_tensors)
        self._frames: list[Any] = []

    def decode(self, frames: list[Any]) -> Any:
        """The message in `frames`; malformed frames raise msgspec.DecodeError, nothing else."""
        if not frames:
            raise msgspec.DecodeError("no frames to decode")
        self._frames = frames
        try:
            return self._decoder.decode(frames[0])
        finally:
            self._frames = []

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code != TENSOR_EXT:
            raise msgspec.DecodeError(f"unknown msgpack extension type {code}")
        import torch  # only processes that receive tensors pay for importing torch

        dtype_name, shape, index = msgspec.msgpack.decode(data, type=tuple[str, list[int], int])
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype) or any(d < 0 for d in shape) or not 0 < index < len(self._frames):
            raise msgspec.DecodeError(f"malformed tensor header: {dtype_name!r}, shape {shape}, frame {index}")
        buffer = self._frames[index]
        if math.prod(shape) * dtype.itemsize != len(buffer):
            raise msgspec.DecodeError(f"tensor frame {index} holds {len(buffer)} bytes, not a {dtype_name} "
                                      f"tensor of shape {shape}")
        if not len(buffer):
            return torch.empty(shape, dtype=dtype)
        raw = np.frombuffer(buffer, dtype=np.uint8)
        return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)


def _no_tensors(code: int, data: memoryview) -> Any:
    raise msgspec.DecodeError(f"unexpected msgpack extension type {code} (no tensors are accepted here)")
