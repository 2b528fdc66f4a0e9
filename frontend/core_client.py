"""The frontend's link to the engine-core process: starts it, sends requests, and runs the output
thread that receives, decodes and processes every output off the caller's event loop."""

import itertools
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import zmq

from conveyor.config import EngineConfig
from conveyor.frontend.errors import EngineDeadError, EngineStartupError
from conveyor.ipc.messages import (
    Abort,
    CorePayload,
    EngineCoreOutputMessage,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    EngineReady,
    UtilityCall,
    UtilityResult,
)
from conveyor.ipc.process import describe_exit, kill_process_group, spawn, terminate
from conveyor.ipc.serial import Decoder, Encoder
from conveyor.ipc.sockets import ipc_address, make_socket, new_ipc_dir, remove_ipc_dir

logger = logging.getLogger(__name__)

POLL_MS = 100  # how often a quiet output thread checks that the core is alive


class CoreClient:
    def __init__(self, config: EngineConfig, max_model_len: int,
                 on_outputs: Callable[[EngineCoreOutputs], None],
                 on_dead: Callable[[EngineDeadError], None]):
        self.on_outputs, self.on_dead = on_outputs, on_dead
        self.ipc_dir = new_ipc_dir()
        self.ctx = zmq.Context(1)
        self.encoder = Encoder()
        self.decoder = Decoder(EngineCoreOutputMessage)
        self.send_lock = threading.Lock()
        self.calls: dict[int, Future] = {}
        self.call_ids = itertools.count()
        self.dead: EngineDeadError | None = None
        self.closing = False
        self.proc: subprocess.Popen | None = None
        self.output_thread: threading.Thread | None = None
        try:
            self.output_socket = make_socket(self.ctx, zmq.PULL, ipc_address(self.ipc_dir, "out"), bind=True)
            input_address = ipc_address(self.ipc_dir, "in")
            payload = CorePayload(config, input_address, self.output_socket.getsockopt_string(zmq.LAST_ENDPOINT),
                                  self.ipc_dir, max_model_len)
            self.proc = spawn("conveyor.engine_core.engine_core", payload, "engine-core", new_process_group=True)
            self.input_socket = make_socket(self.ctx, zmq.PUSH, input_address, bind=False)
        except BaseException:
            self.shutdown()
            raise
        self.num_kv_blocks = 0
        self.output_thread: threading.Thread | None = None

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until the core and its workers are up; raise the cause if they fail to start."""
        try:
            self.num_kv_blocks = self._wait_ready(timeout).num_kv_blocks
        except BaseException:
            self.shutdown()
            raise
        self.output_thread = threading.Thread(target=self._output_loop, daemon=True, name="conveyor-output")
        self.output_thread.start()

    def _wait_ready(self, timeout: float) -> EngineReady:
        deadline = time.monotonic() + timeout
        while not self.output_socket.poll(POLL_MS):
            # A core that fails to start sends its reason first: give that a moment to land.
            if self.proc.poll() is not None and not self.output_socket.poll(500):
                raise EngineStartupError(f"engine failed to start: {describe_exit('engine core', self.proc.returncode)}")
            if time.monotonic() > deadline:
                raise EngineStartupError(f"engine did not start within {timeout:.0f} s")
        message = self.decoder.decode(self.output_socket.recv_multipart(copy=False))
        if isinstance(message, EngineDead):
            raise EngineStartupError(f"engine failed to start: {message.reason}")
        if not isinstance(message, EngineReady):
            raise EngineStartupError(f"unexpected first message from the engine core: {type(message).__name__}")
        return message

    # ---- sending ----

    def _send(self, message) -> None:
        if self.dead is not None:
            raise self.dead
        frames = self.encoder.encode(message)
        with self.send_lock:
            self.input_socket.send_multipart(frames, copy=False)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(request)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.dead is None and not self.closing:
            self._send(Abort(request_ids))

    def call(self, method: str, *args) -> Future:
        """Run `EngineCore.call_<method>` in the core; the future resolves with its result."""
        future: Future = Future()
        call_id = next(self.call_ids)
        self.calls[call_id] = future
        try:
            self._send(UtilityCall(call_id, method, list(args)))
        except BaseException as exc:
            self.calls.pop(call_id, None)
            future.set_exception(exc)
        return future

    # ---- receiving (output thread) ----

    def _output_loop(self) -> None:
        try:
            while not self.closing:
                if not self.output_socket.poll(POLL_MS):
                    # A dying core sends its reason first: give that a moment to land.
                    if self.proc.poll() is not None and not self.output_socket.poll(300):
                        self._die(describe_exit("engine core", self.proc.returncode))
                        return
                    continue
                message = self.decoder.decode(self.output_socket.recv_multipart(copy=False))
                if isinstance(message, EngineCoreOutputs):
                    self.on_outputs(message)
                elif isinstance(message, UtilityResult):
                    self._resolve(message)
                elif isinstance(message, EngineDead):
                    self._die(message.reason)
                    return
        except Exception as exc:  # a bug here must not leave callers hanging
            if not self.closing:
                logger.exception("output thread failed")
                self._die(f"frontend output thread failed: {exc!r}")

    def _resolve(self, result: UtilityResult) -> None:
        future = self.calls.pop(result.call_id, None)
        if future is None:
            return
        if result.error is not None:
            future.set_exception(RuntimeError(result.error))
        else:
            future.set_result(result.result)

    def _die(self, reason: str) -> None:
        if self.closing:
            return
        self.dead = EngineDeadError(f"engine is dead: {reason}")
        for future in list(self.calls.values()):
            if not future.done():
                future.set_exception(self.dead)
        self.calls.clear()
        self.on_dead(self.dead)

    # ---- lifecycle ----

    def shutdown(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.proc is not None:
            terminate(self.proc, timeout=3.0)
            kill_process_group(self.proc)  # workers that outlived the core, if any
        thread = self.output_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        self.ctx.destroy(linger=0)
        remove_ipc_dir(self.ipc_dir)
