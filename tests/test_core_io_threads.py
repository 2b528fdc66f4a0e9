"""An engine core whose input or output thread dies must not serve on deaf or mute: the thread's
error reaches the busy loop, which raises it (and so tells its frontends and exits)."""

import queue
import threading

import pytest

from conveyor.config import EngineConfig
from conveyor.engine_core.engine_core import EngineCoreProc, IoThreadFailed, Send
from conveyor.ipc.messages import CorePayload


class BrokenSocket:
    def __init__(self):
        self.closed = False

    def poll(self, timeout_ms):
        return True

    def recv_multipart(self, copy=True):
        raise RuntimeError("boom")

    def send_multipart(self, frames, copy=True):
        raise AssertionError("nothing encodable should have reached the socket")

    def close(self, linger=None):
        self.closed = True

    def get_monitor_socket(self, events):
        return QuietSocket()

    def disable_monitor(self):
        pass


class QuietSocket:
    def poll(self, timeout_ms):
        return False

    def close(self, linger=None):
        pass


def bare_proc() -> EngineCoreProc:
    """The I/O threads' state without sockets, model or threads."""
    proc = EngineCoreProc.__new__(EngineCoreProc)
    proc.payload = CorePayload(EngineConfig(model="unused"), "ipc:///unused", None, "/unused")
    proc.inputs, proc.outputs = queue.Queue(), queue.Queue()
    proc.output_sockets, proc.clients = {}, {}
    proc.stopping = threading.Event()
    return proc


def test_a_failing_input_thread_makes_the_busy_loop_raise():
    proc, sock = bare_proc(), BrokenSocket()
    proc._input_loop(sock)  # returns: the thread would end here
    assert sock.closed
    message, _ = proc.inputs.get_nowait()
    assert isinstance(message, IoThreadFailed) and message.thread == "input"
    proc.inputs.put((message, None))
    with pytest.raises(RuntimeError, match=r"input thread failed: RuntimeError\('boom'\)"):
        proc._process_inputs(block=False)


def test_a_failing_output_thread_makes_the_busy_loop_raise():
    proc = bare_proc()
    proc.output_sockets[0] = BrokenSocket()
    proc.outputs.put(Send(0, object()))  # msgspec cannot encode it
    proc._output_loop()  # returns: the thread would end here
    with pytest.raises(RuntimeError, match="output thread failed: TypeError"):
        proc._process_inputs(block=False)
