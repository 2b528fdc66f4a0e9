"""The core-worker ring: messages cross intact and in order, however they wrap or however large, a
sleeping reader is woken, and every wait has a way out."""

import multiprocessing
import os
import threading
import time
import zlib

import pytest
import torch

from conveyor.ipc import shm_ring
from conveyor.ipc.serial import Decoder, Encoder
from conveyor.ipc.shm_ring import RingTimeout, ShmRing
from conveyor.ipc.sockets import new_ipc_dir, remove_ipc_dir


@pytest.fixture
def ring_path():
    directory = new_ipc_dir()
    yield f"{directory}/ring"
    remove_ipc_dir(directory)


def message(i: int) -> list[bytes]:
    """Frames of varying sizes (empty ones too) whose content says which message they are."""
    return [str(i).encode() * (i % 37), b"", bytes([i % 256]) * (i * 7 % 300)]


def write_messages(path: str, count: int) -> None:
    ring = ShmRing(path)
    for i in range(count):
        ring.send(message(i))
    ring.send([bytes(range(256)) * 4000])  # 1 MB through a 4 KiB ring


def test_frames_and_tensors_cross_intact(ring_path):
    writer, reader = ShmRing(ring_path, create=True), ShmRing(ring_path)
    tensors = {"a": torch.arange(12).reshape(3, 4).to(torch.bfloat16), "empty": torch.zeros(0, 5)}
    writer.send(Encoder().encode(tensors))
    writer.send([b"", b"x"])
    got = Decoder().decode(reader.recv(timeout=1))
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())
    assert [bytes(f) for f in reader.recv(timeout=1)] == [b"", b"x"]


def test_messages_from_another_process_arrive_in_order_across_wraps_and_stream(ring_path):
    reader = ShmRing(ring_path, capacity=4096, create=True)
    child = multiprocessing.get_context("spawn").Process(target=write_messages, args=(ring_path, 3000))
    child.start()
    try:
        for i in range(3000):  # about 500 KB in all: the 4 KiB ring wraps over a hundred times
            assert [bytes(f) for f in reader.recv(timeout=30)] == message(i), i
        (big,) = reader.recv(timeout=30)
        assert len(big) == 1_024_000 and zlib.crc32(big) == zlib.crc32(bytes(range(256)) * 4000)
    finally:
        child.join(30)
    assert child.exitcode == 0


def test_recv_gives_up_after_its_timeout(ring_path):
    reader = ShmRing(ring_path, create=True)
    assert reader.recv(timeout=0.05) is None
    assert reader.recv(timeout=0.05, spin_s=1.0) is None  # the spin stops at the deadline too


def test_a_sleeping_reader_is_woken_by_the_write(ring_path, monkeypatch):
    # Without the wake-up the reader would sleep until its next liveness check: make that 60 s.
    monkeypatch.setattr(shm_ring, "ALIVE_CHECK_S", 60.0)
    writer, reader = ShmRing(ring_path, create=True), ShmRing(ring_path)
    got = []
    thread = threading.Thread(target=lambda: got.append(reader.recv(timeout=120, spin_s=0.0)), daemon=True)
    thread.start()
    time.sleep(0.3)  # asleep on the FIFO by now
    writer.send([b"wake up"])
    thread.join(20)
    assert not thread.is_alive(), "the reader slept through the write"
    assert [bytes(f) for f in got[0]] == [b"wake up"]


def test_a_failing_liveness_check_ends_the_wait(ring_path):
    reader = ShmRing(ring_path, create=True)

    def dead():
        raise RuntimeError("the writer is dead")

    with pytest.raises(RuntimeError, match="the writer is dead"):
        reader.recv(alive=dead, spin_s=0.0)  # no timeout: only the check can end it


def test_a_writer_waiting_for_room_gives_up(ring_path):
    writer = ShmRing(ring_path, capacity=4096, create=True)  # nobody reads
    writer.send([b"x" * 4000])
    with pytest.raises(RingTimeout, match="no room"):
        writer.send([b"y" * 1000], timeout=0.2)
    checks = []

    def dead():
        checks.append(1)
        raise RuntimeError("the reader is dead")

    with pytest.raises(RuntimeError, match="the reader is dead"):
        writer.send([b"y" * 1000], alive=dead)
    assert checks


def test_an_unlinked_ring_still_carries_messages(ring_path):
    writer, reader = ShmRing(ring_path, create=True), ShmRing(ring_path)
    writer.unlink()
    assert not os.path.exists(ring_path) and not os.path.exists(ring_path + ".wake")
    writer.send([b"still here"])
    assert [bytes(f) for f in reader.recv(timeout=5, spin_s=0.0)] == [b"still here"]
