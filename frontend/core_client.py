"""The frontend's link to the engine-core process: starts it (or connects to a running one), sends
requests, and runs the output thread that receives, decodes and processes every output off the
caller's event loop.

A core this client spawned is watched through its process handle; a core it connected to (another
API server's, or a headless one on another host) through heartbeats: silence for PEER_TIMEOUT_S
means it is dead."""

import itertools
import logging
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import msgspec
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
    Goodbye,
    Heartbeat,
    Hello,
    UtilityCall,
    UtilityResult,
)
from conveyor.ipc.process import describe_exit, kill_process_group, spawn, terminate
from conveyor.ipc.serial import Decoder, Encoder
from conveyor.ipc.sockets import (
    HANDSHAKE_FAILED,
    HEARTBEAT_S,
    PEER_TIMEOUT_S,
    bound_address,
    check_engine_secret,
    handshake_failure,
    ipc_address,
    make_socket,
    new_ipc_dir,
    output_address_toward,
    remove_ipc_dir,
)

logger = logging.getLogger(__name__)

POLL_MS = 100  # how often a quiet output thread checks that the core is alive
LAST_WORD_MS = 500  # how long a spawned core's EngineDead may trail its exit


class CoreClient:
    """`engine_address` None: spawn a private core (this client is its client 0). Otherwise connect
    to the core listening there (tcp://HOST:PORT or ipc://PATH) as a new client."""

    def __init__(self, config: EngineConfig, on_outputs: Callable[[EngineCoreOutputs], None],
                 on_dead: Callable[[EngineDeadError], None], engine_address: str | None = None):
        self.on_outputs, self.on_dead = on_outputs, on_dead
        self.engine_address = engine_address
        remote = engine_address is not None and engine_address.startswith("tcp://")
        if remote:
            check_engine_secret(engine_address, config.engine_secret)
        # our sockets toward a tcp core run CurveZMQ with the secret, as its clients (ipc/sockets.py)
        secret = config.engine_secret if remote else None
        # sockets on this host: a spawned core's, or ours toward a core at an ipc:// address (one at
        # tcp:// needs none, so a frontend killed outright leaves nothing behind)
        self.ipc_dir = new_ipc_dir() if engine_address is None or engine_address.startswith("ipc://") else None
        self.ctx = zmq.Context(1)
        self.encoder = Encoder()
        self.decoder = Decoder(EngineCoreOutputMessage, tensors=False)
        self.send_lock = threading.Lock()
        self.calls: dict[int, Future] = {}
        self.call_ids = itertools.count()
        self.failure: EngineDeadError | None = None  # why the engine died, once it has
        self.closing = False
        self.proc: subprocess.Popen | None = None
        self.output_thread: threading.Thread | None = None
        self.handshake_monitor: zmq.Socket | None = None  # a shared core's refusal, until it is ready
        self.last_sent = self.last_received = time.monotonic()
        try:
            if engine_address is None:
                self.client_index = 0
                self.output_socket = make_socket(self.ctx, zmq.PULL, ipc_address(self.ipc_dir, "out"), bind=True)
                input_address = ipc_address(self.ipc_dir, "in")
                payload = CorePayload(config, input_address, bound_address(self.output_socket), self.ipc_dir)
                self.proc = spawn("conveyor.engine_core.engine_core", payload, "engine-core", new_process_group=True)
                self.input_socket = make_socket(self.ctx, zmq.PUSH, input_address, bind=False)
            else:
                self.client_index = secrets.randbits(62) + 1  # frontends pick theirs independently
                address = output_address_toward(engine_address, self.ipc_dir)
                self.output_socket = make_socket(self.ctx, zmq.PULL, address, bind=True, secret=secret)
                self.input_socket = make_socket(self.ctx, zmq.PUSH, engine_address, bind=False, secret=secret)
                self.handshake_monitor = self.input_socket.get_monitor_socket(HANDSHAKE_FAILED)
        except BaseException:
            self.shutdown()
            raise
        self.num_kv_blocks = self.max_model_len = 0  # the core's word, once it is ready

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until the core and its workers are up; raise the cause if they fail to start. A
        shared core hears from us only from here on: it forgets a client that is silent too long."""
        try:
            if self.proc is None:
                self._send(Hello(self.client_index, bound_address(self.output_socket)))
            ready = self._wait_ready(timeout)
            self.num_kv_blocks, self.max_model_len = ready.num_kv_blocks, ready.max_model_len
        except BaseException:
            self.shutdown()
            raise
        if self.handshake_monitor is not None:
            self.input_socket.disable_monitor()
            self.handshake_monitor.close(linger=0)
            self.handshake_monitor = None
        self.output_thread = threading.Thread(target=self._output_loop, daemon=True, name="conveyor-output")
        self.output_thread.start()

    def _wait_ready(self, timeout: float) -> EngineReady:
        deadline = time.monotonic() + timeout
        while True:  # heartbeats say the core lives while it loads; EngineReady ends the wait
            if self.output_socket.poll(POLL_MS):
                if (message := self._receive()) is None:
                    continue
                if isinstance(message, EngineReady):
                    return message
                if isinstance(message, EngineDead):
                    raise EngineStartupError(f"engine failed to start: {message.reason}")
                if not isinstance(message, Heartbeat):
                    raise EngineStartupError(f"unexpected first message from the engine core: {type(message).__name__}")
                continue
            self._check_handshake()
            self._beat_if_quiet()  # a shared core may still be loading: it must not forget us meanwhile
            if (how := self._spawned_core_exit()) is not None:
                raise EngineStartupError(f"engine failed to start: {how}")
            if self.proc is None and time.monotonic() - self.last_received > PEER_TIMEOUT_S:
                raise EngineStartupError(f"no engine core answered at {self.engine_address} "
                                         f"within {PEER_TIMEOUT_S:g} s")
            if time.monotonic() > deadline:
                raise EngineStartupError(f"engine did not start within {timeout:.0f} s")

    def _check_handshake(self) -> None:
        while self.handshake_monitor is not None and self.handshake_monitor.poll(0):
            if (failure := handshake_failure(self.handshake_monitor)) is not None:
                raise EngineStartupError(f"the engine core at {self.engine_address} refused the handshake "
                                         f"({failure}): give it and this frontend the same engine secret")

    # ---- sending ----

    def _send(self, message) -> None:
        if self.failure is not None:
            raise self.failure
        frames = self.encoder.encode(message)
        with self.send_lock:
            self.input_socket.send_multipart(frames, copy=False)
            self.last_sent = time.monotonic()

    def add_request(self, request: EngineCoreRequest) -> None:
        request.client_index = self.client_index
        self._send(request)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.failure is None and not self.closing:
            self._send(Abort(request_ids, self.client_index))

    def call(self, method: str, *args) -> Future:
        """Run `EngineCore.call_<method>` in the core; the future resolves with its result."""
        future: Future = Future()
        call_id = next(self.call_ids)
        self.calls[call_id] = future
        try:
            self._send(UtilityCall(call_id, method, list(args), self.client_index))
        except BaseException as exc:
            self.calls.pop(call_id, None)
            future.set_exception(exc)
        return future

    # ---- receiving (output thread) ----

    def _output_loop(self) -> None:
        try:
            while not self.closing and self.failure is None:
                if not self.output_socket.poll(POLL_MS):
                    self._check_core()
                    continue
                if (message := self._receive()) is None:
                    continue
                if isinstance(message, EngineCoreOutputs):
                    self.on_outputs(message)
                elif isinstance(message, UtilityResult):
                    self._resolve(message)
                elif isinstance(message, EngineDead):
                    self._die(message.reason)
                    return
                self._beat_if_quiet()  # a steady stream of outputs never leaves the poll idle
        except EngineDeadError:
            return
        except Exception as exc:  # a bug here must not leave callers hanging
            if not self.closing:
                logger.exception("output thread failed")
                self._die(f"frontend output thread failed: {exc!r}")

    def _receive(self) -> EngineCoreOutputMessage | None:
        """The next message from the core; None for one that does not decode (from a peer that is
        not the core: only a link without a secret lets one in), which is dropped."""
        frames = self.output_socket.recv_multipart(copy=False)
        try:
            message = self.decoder.decode(frames)
        except (msgspec.DecodeError, ValueError) as exc:
            logger.warning("dropped a malformed message on the output socket: %s", exc)
            return None
        self.last_received = time.monotonic()
        return message

    def _check_core(self) -> None:
        """On a quiet link: is the core still there?"""
        if self.proc is not None:
            if (how := self._spawned_core_exit()) is not None:
                self._die(how)
            return
        if time.monotonic() - self.last_received > PEER_TIMEOUT_S:
            self._die(f"no heartbeat from the engine core at {self.engine_address} for {PEER_TIMEOUT_S:g} s")
        else:
            self._beat_if_quiet()

    def _spawned_core_exit(self) -> str | None:
        """How the core this client spawned exited, once it has and its last word (EngineDead, with
        the cause, which the caller reads instead) has not landed within LAST_WORD_MS."""
        if self.proc is None or self.proc.poll() is None or self.output_socket.poll(LAST_WORD_MS):
            return None
        return describe_exit("engine core", self.proc.returncode)

    def _beat_if_quiet(self) -> None:
        """Tell a core we connected to that we live (a core we spawned has our lifeline instead)."""
        if self.proc is None and time.monotonic() - self.last_sent > HEARTBEAT_S:
            self._send(Heartbeat(self.client_index))

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
        self.failure = EngineDeadError(f"engine is dead: {reason}")
        for future in list(self.calls.values()):
            if not future.done():
                future.set_exception(self.failure)
        self.calls.clear()
        self.on_dead(self.failure)

    # ---- lifecycle ----

    def shutdown(self) -> None:
        if self.closing:
            return
        if self.proc is None and self.failure is None and hasattr(self, "input_socket"):
            try:  # a shared core: abort what we still run there, now rather than at our timeout
                self._send(Goodbye(self.client_index))
            except zmq.ZMQError:
                pass
        self.closing = True
        if self.proc is not None:
            terminate(self.proc, timeout=3.0)
            kill_process_group(self.proc)  # workers that outlived the core, if any
        thread = self.output_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        # A shared core must still get our Goodbye: linger briefly for it.
        self.ctx.destroy(linger=0 if self.proc is not None else 500)
        remove_ipc_dir(self.ipc_dir)
