"""A one-way message pipe in shared memory, one writer and one reader: how the core and each worker
talk (steps one way, results the other).

A message crosses with no system call when the reader is already looking: the writer copies it
into a ring of bytes in a file both processes map, then advances a counter; the reader, which
checks the counter before it waits, finds it there. Only a reader that has gone to sleep costs the
writer a wake-up, one byte into a FIFO. A zmq socket costs a wake-up of the sender's I/O thread,
the receiver's, and then the receiver, on every message, a measurable share of a small model's
step (docs/benchmarks.md). vLLM's workers take their steps from a shared-memory ring for the same
reason.

The reader waits in two phases: it spins, yielding the CPU on every turn, for up to `spin_s` (the
short waits of a busy engine; the engine spins only where the workers leave a CPU free), then
flags itself asleep and blocks on the FIFO, so that an idle engine burns nothing. Writer: data,
fence, counter, fence, look at the flag. Reader: flag, fence, look at the counter. Either the
writer sees the flag and wakes the reader, or the reader sees the data; x86 keeps stores in order
anyway, and the fences are what other CPUs need.

The file: the writer's byte count (`head`) at 0, the reader's (`tail`) at 64, the reader's asleep
flag at 128, the ring from 4096. A message is its length (8 bytes), then its frame count (4), each
frame's length (8 each) and the frames. One larger than the ring streams through it, the writer
waiting for room. The file must be in memory (tmpfs, `new_ipc_dir`): on a disk, writeback would
fault the pages in again and again.
"""

import ctypes
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable

_HEAD, _TAIL, _ASLEEP, _DATA = 0, 64, 128, 4096
_LENGTH = struct.Struct("<Q")
_ONE_FRAME = struct.Struct("<QIQ")  # length, frame count (1), the frame's length
_fence_lock = threading.Lock()

# How long a reader that has a CPU to itself spins before it sleeps. A busy engine's waits are
# shorter (the core is late by tens of µs; a result comes within one step) and cost no system call.
# A longer wait is a step long enough that one wake-up (about 10 µs) is noise, or an idle engine.
SPIN_S = 0.005
ALIVE_CHECK_S = 0.05


def ring_spin_s(spare_cpus: bool) -> float:
    """How long the engine core or a worker, waiting on its ring, spins before it sleeps: spinning
    takes a CPU, so only where the workers leave one free (`EngineConfig.has_spare_cpus`)."""
    return SPIN_S if spare_cpus else 0.0


def memory_fence() -> None:
    """A full fence: taking a lock is an atomic read-modify-write (Python exposes no fence)."""
    with _fence_lock:
        pass


class RingTimeout(TimeoutError):
    """The other side did not keep up in time: it made no room for a message, or left one
    unfinished. The ring is of no further use."""


def _no_check() -> None:
    pass


class ShmRing:
    """One side of the ring at `path`. The side that starts the other process creates it
    (`create=True`) before the other opens it. One process writes, one reads."""

    def __init__(self, path: str, capacity: int = 1 << 20, create: bool = False):
        if create:
            with open(path, "wb") as f:
                f.truncate(_DATA + capacity)
            os.mkfifo(path + ".wake")
        with open(path, "r+b") as f:  # populated: no page faults on the step path
            self._map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        self.path = path
        self.capacity = len(self._map) - _DATA
        self._head = ctypes.c_uint64.from_buffer(self._map, _HEAD)
        self._tail = ctypes.c_uint64.from_buffer(self._map, _TAIL)
        self._asleep = ctypes.c_uint64.from_buffer(self._map, _ASLEEP)
        self._written = self._head.value  # the writer's count, ahead of `head` until published
        self._wake = os.open(path + ".wake", os.O_RDWR | os.O_NONBLOCK)  # RDWR: never blocks on open

    # ---- writer ----

    def send(self, frames: list, alive: Callable[[], None] = _no_check, timeout: float = 600.0) -> None:
        """Write one message of `frames` (bytes-like). Returns at once unless the ring is full;
        then waits for the reader to make room, calling `alive` (which may raise) as it waits."""
        if len(frames) == 1:  # most messages: msgpack alone, no tensor beside it
            size = memoryview(frames[0]).nbytes
            message = _ONE_FRAME.pack(12 + size, 1, size) + frames[0]
            if len(message) <= self._room():
                self._copy_in(message)
                self._publish()
                return
        sizes = [memoryview(f).nbytes for f in frames]
        header = struct.pack(f"<QI{len(frames)}Q", 4 + 8 * len(frames) + sum(sizes), len(frames), *sizes)
        if len(header) + sum(sizes) <= self._room():
            self._copy_in(header)  # it all fits: published once
            for frame in frames:
                self._copy_in(frame)
            self._publish()
            return
        deadline = time.monotonic() + timeout
        for piece in (header, *frames):
            view = memoryview(piece).cast("B")
            while view:
                if not (room := self._room()):
                    self._publish()  # let the reader take what is there
                    _nap(deadline, alive, "the reader made no room in the ring")
                    continue
                self._copy_in(view[:room])
                view = view[room:]
        self._publish()

    def _room(self) -> int:
        return self.capacity - (self._written - self._tail.value)

    def _copy_in(self, data) -> None:
        view = memoryview(data).cast("B")
        n, pos = len(view), self._written % self.capacity
        if pos + n <= self.capacity:
            self._map[_DATA + pos : _DATA + pos + n] = view
        else:  # wraps
            first = self.capacity - pos
            self._map[_DATA + pos : _DATA + self.capacity] = view[:first]
            self._map[_DATA : _DATA + n - first] = view[first:]
        self._written += n

    def _publish(self) -> None:
        memory_fence()  # the data before the count
        self._head.value = self._written
        memory_fence()  # the count before the look at the flag
        if self._asleep.value:
            try:
                os.write(self._wake, b"\0")
            except BlockingIOError:
                pass  # the FIFO is full of wake-ups already

    # ---- reader ----

    def recv(self, timeout: float | None = None, alive: Callable[[], None] = _no_check,
             spin_s: float = SPIN_S) -> list[memoryview] | None:
        """The next message's frames, or None if none starts within `timeout` seconds (None: wait
        as long as it takes). While it waits, `alive` runs every 50 ms and may raise."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._wait(_LENGTH.size, deadline, alive, spin_s):
            return None
        (length,) = _LENGTH.unpack(self._take(_LENGTH.size))
        body = memoryview(self._take_all(length, deadline, alive))
        (count,) = struct.unpack_from("<I", body)
        if count == 1:
            return [body[12:]]
        frames, offset = [], 4 + 8 * count
        for size in struct.unpack_from(f"<{count}Q", body, 4):
            frames.append(body[offset : offset + size])
            offset += size
        return frames

    def _available(self) -> int:
        return self._head.value - self._tail.value

    def _take(self, n: int) -> bytes:
        """Copy out, and release, `n` bytes that are there."""
        memory_fence()  # the count (read by the caller) before the data
        tail = self._tail.value
        pos = tail % self.capacity
        first = min(n, self.capacity - pos)
        data = self._map[_DATA + pos : _DATA + pos + first]
        if first < n:
            data += self._map[_DATA : _DATA + n - first]
        self._tail.value = tail + n
        return data

    def _take_all(self, n: int, deadline: float | None, alive: Callable[[], None]) -> bytes:
        if self._available() >= n:
            return self._take(n)
        parts, left = [], n  # more than the ring holds: it streams in
        while left:
            if not self._wait(1, deadline, alive, 0.0):
                raise RingTimeout("the writer stopped in the middle of a message")
            part = self._take(min(left, self._available()))
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    def _wait(self, n: int, deadline: float | None, alive: Callable[[], None], spin_s: float) -> bool:
        """Until at least `n` bytes are there (True) or the deadline (False)."""
        if self._available() >= n:
            return True
        now = time.monotonic()
        spin_end = now + spin_s if deadline is None else min(now + spin_s, deadline)
        while now < spin_end:
            os.sched_yield()  # let whatever else wants this CPU run (it releases the GIL too)
            if self._available() >= n:
                return True
            now = time.monotonic()
        next_check = now + ALIVE_CHECK_S
        while True:
            self._asleep.value = 1
            memory_fence()  # the flag before the last look
            if self._available() >= n:
                self._asleep.value = 0
                return True
            if deadline is not None and now >= deadline:
                self._asleep.value = 0
                return False
            select.select([self._wake], [], [], (next_check if deadline is None else min(next_check, deadline)) - now)
            self._asleep.value = 0
            try:
                os.read(self._wake, 4096)
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now >= next_check:
                alive()
                next_check = now + ALIVE_CHECK_S

    def unlink(self) -> None:
        """Remove the ring's files once both sides have opened them: the memory then goes with
        the last process that maps it, however the processes end."""
        for path in (self.path, self.path + ".wake"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Unmap (the other side may still hold the file; the owner of the directory removes it)."""
        self._head = self._tail = self._asleep = None  # they pin the map while they live
        os.close(self._wake)
        self._map.close()


def _nap(deadline: float, alive: Callable[[], None], what: str) -> None:
    alive()
    if time.monotonic() > deadline:
        raise RingTimeout(what)
    time.sleep(0.0005)
