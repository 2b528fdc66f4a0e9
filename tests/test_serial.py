"""Tensors cross process boundaries as raw side frames (no pickle), in any dtype, and come back equal."""

import msgspec
import pytest
import torch
import zmq

from conveyor.ipc.messages import Heartbeat
from conveyor.ipc.serial import Decoder, Encoder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_tensor_round_trip_through_a_socket(dtype):
    tensors = {"a": torch.arange(12).reshape(3, 4).to(dtype), "empty": torch.zeros(0, 5, dtype=dtype)}
    frames = Encoder().encode(tensors)
    assert len(frames) == 3  # the msgpack body, then one raw buffer per tensor
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        push.send_multipart(frames, copy=False)
        got = Decoder().decode(pull.recv_multipart(copy=False))
    finally:
        push.close(0)
        pull.close(0)
    for name, tensor in tensors.items():
        assert got[name].dtype == dtype and got[name].shape == tensor.shape and torch.equal(got[name], tensor)


def test_messages_need_no_tensor_frames():
    assert len(Encoder().encode(Heartbeat(3))) == 1


def test_objects_that_are_not_messages_or_tensors_are_refused():
    with pytest.raises(TypeError, match="cannot encode"):
        Encoder().encode({"x": object()})


def test_a_tensor_without_its_side_frame_or_not_fitting_it_is_a_decode_error():
    frames = Encoder().encode({"a": torch.arange(6)})
    with pytest.raises(msgspec.DecodeError, match="malformed tensor header.*frame 1"):
        Decoder().decode(frames[:1])
    with pytest.raises(msgspec.DecodeError, match="frame 1 holds 3 bytes, not a int64 tensor"):
        Decoder().decode([frames[0], b"123"])


def test_a_decoder_without_tensors_refuses_one():
    with pytest.raises(msgspec.DecodeError, match="no tensors are accepted"):
        Decoder(tensors=False).decode(Encoder().encode({"a": torch.arange(6)}))
