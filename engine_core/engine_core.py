"""The engine-core process: a busy loop of schedule -> run on workers -> update -> emit outputs,
with the next step scheduled while the workers run the current one (async scheduling).

Socket reads and msgpack decoding run on an input thread, encoding and socket writes on an output
thread, so the loop itself only schedules. It blocks (never spins) while there is no work.

One core serves any number of frontends (clients). The frontend that spawned the core is client 0
and is known from the start; others (API servers of `conveyor serve --api-server-count`, or
frontends on other hosts of a `--headless` core) announce themselves with Hello, get EngineReady
back, and then only ever receive the outputs of their own requests. Links to clients carry
heartbeats both ways: a client silent for PEER_TIMEOUT_S is forgotten and its requests aborted.
"""

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

import msgspec
import zmq

from conveyor.config import EngineConfig
from conveyor.engine_core.executor import Executor
from conveyor.engine_core.kv_cache_manager import prompt_block_hashes
from conveyor.engine_core.request import Request, RequestStatus
from conveyor.engine_core.scheduler import Scheduler
from conveyor.ipc.messages import (
    Abort,
    CorePayload,
    EngineCoreInput,
    EngineCoreOutput,
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
from conveyor.ipc.process import freeze_startup_objects, read_payload, run_child, summarize_failure
from conveyor.ipc.serial import Decoder, Encoder
from conveyor.ipc.sockets import (
    HANDSHAKE_FAILED,
    HEARTBEAT_S,
    PEER_TIMEOUT_S,
    check_engine_secret,
    check_output_address,
    handshake_failure,
    make_socket,
    new_ipc_dir,
    remove_ipc_dir,
)
from conveyor.sampling_params import resolve_max_tokens
from conveyor.seeds import derive_seed

logger = logging.getLogger(__name__)

IDLE_CHECK_S = 0.5  # how often an idle core checks that its workers are alive
REFUSAL_LOG_S = 10.0


class EngineCore:
    """Scheduler plus executor, with no sockets: one call of `step` is one model step."""

    def __init__(self, config: EngineConfig, ipc_dir: str):
        self.config = config
        self.executor = Executor(config, ipc_dir)
        self.executor.collective_call("init_kv_cache", self.executor.num_blocks)
        self.scheduler = Scheduler(config, self.executor.num_blocks, self.executor.max_model_len)
        self.pipeline_depth = 2 if config.uses_async_scheduling(self.executor.device_type) else 1
        self.in_flight: deque[float] = deque()  # when each step the workers hold was scheduled
        self.last_step_end = 0.0
        self.last_step_time = 0.0
        self.last_model_time = 0.0
        self.num_steps = 0
        self.total_step_time = 0.0
        self.total_model_time = 0.0
        self.num_requests_added = 0  # numbers the unseeded requests' seeds

    def add_request(self, message: EngineCoreRequest, block_hashes: list[int] | None = None) -> EngineCoreOutput | None:
        """Queue a request, or return the error output of one that can never run. `block_hashes`:
        its full prompt blocks' hashes, if computed already (`prompt_block_hashes`)."""
        params = message.sampling_params
        num_prompt_tokens = len(message.prompt_token_ids)
        if message.request_id in self.scheduler.requests:  # frontends pick ids independently
            error = f"request_id {message.request_id!r} is already in use"
        elif (error := prompt_table_problem(message, self.executor.hidden_size)) is not None:
            pass
        elif (error := out_of_vocabulary(message, self.executor.vocab_size)) is None:
            try:
                max_tokens = resolve_max_tokens(num_prompt_tokens, params.max_tokens, self.scheduler.max_model_len)
                error = self.scheduler.check_fits(num_prompt_tokens, max_tokens)
            except ValueError as e:
                error = str(e)
        lora_path = None
        if error is None and message.lora_id:
            lora_path, error = self.resolve_lora(message)
        if error is not None:
            return EngineCoreOutput(message.request_id, [], finish_reason="error", error=error)
        seed = params.seed
        if seed is None:
            seed = derive_seed(self.config.seed, self.num_requests_added)
        self.num_requests_added += 1
        self.scheduler.add_request(Request(
            request_id=message.request_id,
            prompt_token_ids=message.prompt_token_ids,
            sampling_params=params,
            client_index=message.client_index,
            arrival_time=message.arrival_time,
            priority=message.priority,
            lora_id=message.lora_id,
            lora_path=lora_path,
            cache_salt=message.cache_salt,
            prompt_embedding_table=message.prompt_embedding_table,
            max_tokens=max_tokens,
            sampling_seed=seed,
            block_hashes=block_hashes or [],
        ))
        return None

    def resolve_lora(self, message: EngineCoreRequest) -> tuple[str | None, str | None]:
        """(the adapter's path, None), or (None, why the request cannot name it)."""
        if not self.config.enable_lora:
            return None, "LoRA adapters need an engine started with enable_lora"
        if message.lora_id < 0:
            return None, f"lora_id must be >= 0, got {message.lora_id}"
        pending = message.lora_path is None and any(
            r.lora_id == message.lora_id for r in self.scheduler.requests.values())
        return self.scheduler.lora_cache.resolve(message.lora_id, message.lora_path, pending)

    def abort(self, request_ids: list[str], client_index: int) -> list[Request]:
        """Those of `request_ids` that belong to the frontend `client_index` (no other frontend's)."""
        requests = self.scheduler.requests
        ids = [i for i in request_ids if (r := requests.get(i)) is not None and r.client_index == client_index]
        return self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)

    def abort_client(self, client_index: int) -> list[Request]:
        """Every request of a frontend that left or went silent."""
        ids = [r.request_id for r in self.scheduler.requests.values() if r.client_index == client_index]
        return self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.in_flight)

    def step(self) -> list[tuple[Request, EngineCoreOutput]]:
        """Submit the next step if one can run, then collect the oldest step in flight once the
        pipeline is full (or nothing new was submitted); returns the collected step's outputs.

        With async scheduling the pipeline holds two steps: the workers run one while the core
        applies the previous result, emits its outputs and schedules the next.
        """
        if len(self.in_flight) < self.pipeline_depth:
            start = time.perf_counter()
            if (step := self.scheduler.schedule()) is not None:
                self.executor.submit(step)
                self.in_flight.append(start)
                if len(self.in_flight) < self.pipeline_depth:
                    return []
        if not self.in_flight:
            return []
        result = self.executor.collect()
        outputs = self.scheduler.update_from_output(result)
        end = time.perf_counter()
        # A step's time runs from its scheduling, or from the end of the previous step if that
        # was later, to the end of applying its result: the steps' times add up to the busy time.
        self.last_step_time = end - max(self.in_flight.popleft(), self.last_step_end)
        self.last_step_end = end
        self.last_model_time = result.model_time
        self.num_steps += 1
        self.total_step_time += self.last_step_time
        self.total_model_time += self.last_model_time
        return outputs

    def stats(self):
        stats = self.scheduler.stats(self.last_step_time, self.last_model_time)
        stats.num_steps, stats.total_step_time, stats.total_model_time = (
            self.num_steps, self.total_step_time, self.total_model_time)
        return stats

    # ---- utility calls (UtilityCall.method) ----

    def call_stats(self) -> dict:
        return msgspec.structs.asdict(self.stats())

    def call_reset_prefix_cache(self) -> bool:
        return self.scheduler.kv_cache.reset_prefix_cache()

    def call_set_grammar_tokenizer(self, info: str) -> bool:
        """A frontend's view of the tokenizer for structured outputs (xgrammar's serialized
        TokenizerInfo): it reaches every worker with the next step, before any step that samples
        for a request this frontend sends after this call."""
        if not isinstance(info, str) or not info:
            raise ValueError("set_grammar_tokenizer takes xgrammar's serialized TokenizerInfo")
        self.scheduler.grammar_tokenizer = info
        return True

    def shutdown(self) -> None:
        self.executor.shutdown()


# ---- what the busy loop asks of the output thread ----


@dataclass(frozen=True, slots=True)
class Send:
    """Encode `message` and send it to frontend `client` (if it is connected)."""

    client: int
    message: object


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send `message` to every connected frontend."""

    message: object


@dataclass(frozen=True, slots=True)
class Connect:
    """Connect to a frontend's output socket, unless connected already."""

    client: int
    address: str


@dataclass(frozen=True, slots=True)
class Forget:
    """Close a frontend's output socket."""

    client: int


@dataclass(frozen=True, slots=True)
class Stop:
    """End the output thread, once everything queued before is sent."""


OutputCommand = Send | Broadcast | Connect | Forget | Stop


class IoThreadFailed:
    """What an I/O thread that dies leaves in the input queue: the busy loop raises it, so a core
    that can no longer hear or answer dies loudly (its frontends learn it) rather than serve on."""

    def __init__(self, thread: str, error: BaseException):
        self.thread, self.error = thread, error


class RefusalLog:
    """Connections the input socket refused, logged at most once per REFUSAL_LOG_S (a frontend
    with another secret retries ten times a second)."""

    def __init__(self, address: str):
        self.address, self.count, self.last_logged = address, 0, -REFUSAL_LOG_S

    def note(self, failure: str) -> None:
        self.count += 1
        if (now := time.monotonic()) - self.last_logged >= REFUSAL_LOG_S:
            logger.warning("refused %d connection(s) to %s: the handshake failed (%s): a peer without the engine "
                           "secret or with another one, or not a Conveyor frontend", self.count, self.address, failure)
            self.count, self.last_logged = 0, now


class EngineCoreProc:
    """EngineCore behind sockets: the process's busy loop and its two I/O threads."""

    def __init__(self, payload: CorePayload):
        self.payload = payload
        # a tcp link's sockets run CurveZMQ with the secret, this side as the server (ipc/sockets.py)
        self.secret = payload.config.engine_secret if payload.input_address.startswith("tcp://") else None
        self.ctx = zmq.Context(1)
        self.inputs: queue.Queue = queue.Queue()  # (message, its prompt's block hashes or None)
        self.outputs: queue.Queue[OutputCommand] = queue.Queue()
        self.output_sockets: dict[int, zmq.Socket] = {}
        # client index -> when it was last heard from (None: the spawning frontend, whose death the
        # stdin lifeline reports instead)
        self.clients: dict[int, float | None] = {}
        self.ready: EngineReady | None = None
        self.stopping = threading.Event()
        self.input_thread: threading.Thread | None = None
        self.output_thread = threading.Thread(target=self._output_loop, daemon=True, name="core-output")
        self.output_thread.start()
        if payload.output_address is not None:
            self.clients[0] = None
            self.outputs.put(Connect(0, payload.output_address))
        self._start_input_thread()
        try:
            self.core = EngineCore(payload.config, payload.ipc_dir)
        except BaseException as exc:
            self._die(exc)
            raise
        freeze_startup_objects()  # the block pool's thousands of blocks live as long as the core
        self.ready = EngineReady(self.core.scheduler.max_model_len, self.core.executor.num_blocks)
        for client in self.clients:
            self.outputs.put(Send(client, self.ready))

    def _start_input_thread(self) -> None:
        """Listen at once: frontends that connect while the model loads get heartbeats meanwhile.
        The socket is bound here, so a taken port fails the constructor; then only the thread uses it."""
        address = self.payload.input_address
        try:
            sock = make_socket(self.ctx, zmq.PULL, address, bind=True, secret=self.secret, curve_server=True)
        except zmq.ZMQError as exc:
            self._die(exc)
            raise RuntimeError(f"engine core cannot listen at {address}: {exc}") from exc
        self.input_thread = threading.Thread(target=self._input_loop, args=(sock,), daemon=True, name="core-input")
        self.input_thread.start()

    # ---- the busy loop ----

    def run(self) -> None:
        try:
            while True:
                self._process_inputs(block=not self.core.has_work())
                outputs = self.core.step()
                if outputs:
                    self._emit(outputs)
        except BaseException as exc:
            self._die(exc)
            raise

    def _process_inputs(self, block: bool) -> None:
        """Handle every input queued; with `block` (an idle core), first wait for one, checking
        meanwhile that the workers live."""
        if block:
            while (item := self._next_input(IDLE_CHECK_S)) is None:
                self.core.executor.check_alive()
                self._forget_silent_clients()
            self._handle(*item)
        while (item := self._next_input(None)) is not None:
            self._handle(*item)
        self._forget_silent_clients()

    def _next_input(self, timeout: float | None) -> tuple[object, list[int] | None] | None:
        """The next (message, block hashes), waiting up to `timeout` (None: not at all)."""
        try:
            return self.inputs.get_nowait() if timeout is None else self.inputs.get(timeout=timeout)
        except queue.Empty:
            return None

    def _handle(self, message, block_hashes: list[int] | None) -> None:
        if isinstance(message, IoThreadFailed):
            raise RuntimeError(f"engine core {message.thread} thread failed: {message.error!r}") from message.error
        try:
            self._handle_frontend(message, block_hashes)
        except Exception:  # whatever a frontend's message does wrong fails that message alone
            logger.exception("dropped a %s message that failed", type(message).__name__)

    def _handle_frontend(self, message, block_hashes: list[int] | None) -> None:
        client = message.client_index
        if self.clients.get(client) is not None:  # any message, Heartbeat included, shows it alive
            self.clients[client] = time.monotonic()
        match message:
            case EngineCoreRequest():
                if client not in self.clients:  # forgotten after a silence: nobody would get its outputs
                    logger.warning("dropped request %s of unknown frontend %d", message.request_id, client)
                    return
                error = self.core.add_request(message, block_hashes)
                if error is not None:
                    self._send(client, [error])
            case Abort():
                self.core.abort(message.request_ids, client)
            case Hello():
                if client in self.clients and self.clients[client] is None:  # the spawning frontend's index
                    logger.warning("dropped a Hello that claims client index %d, the spawning frontend's", client)
                    return
                self.clients[client] = time.monotonic()
                self.outputs.put(Send(client, self.ready))
            case Goodbye():
                self._forget(client, "left")
            case UtilityCall():
                self.outputs.put(Send(client, self._call(message)))

    def _call(self, call: UtilityCall) -> UtilityResult:
        try:
            return UtilityResult(call.call_id, getattr(self.core, f"call_{call.method}")(*call.args))
        except Exception as exc:  # a bad call fails alone
            return UtilityResult(call.call_id, error=f"{type(exc).__name__}: {exc}")

    def _forget_silent_clients(self) -> None:
        now = time.monotonic()
        for client, seen in list(self.clients.items()):
            if seen is not None and now - seen > PEER_TIMEOUT_S:
                self._forget(client, f"was silent for {PEER_TIMEOUT_S:g} s")

    def _forget(self, client: int, why: str) -> None:
        if self.clients.pop(client, False) is False:
            return
        aborted = self.core.abort_client(client)
        logger.warning("frontend %d %s: aborted its %d requests", client, why, len(aborted))
        self.outputs.put(Forget(client))

    def _emit(self, outputs) -> None:
        by_client: dict[int, list[EngineCoreOutput]] = {}
        for request, output in outputs:
            by_client.setdefault(request.client_index, []).append(output)
        for client, client_outputs in by_client.items():
            self._send(client, client_outputs)

    def _send(self, client: int, outputs: list[EngineCoreOutput]) -> None:
        stats = self.core.stats()
        self.outputs.put(Send(client, EngineCoreOutputs(outputs, time.time(), stats)))

    def _die(self, exc: BaseException) -> None:
        """Send every frontend the core's last word, `EngineDead` with the cause, then stop both
        I/O threads."""
        if not isinstance(exc, SystemExit | KeyboardInterrupt):
            # A failure to start is reported by whoever started the core (see core_main, run_headless).
            logger.log(logging.ERROR if self.ready else logging.DEBUG, "engine core failed:\n%s",
                       traceback.format_exc())
        self.outputs.put(Broadcast(EngineDead(death_reason(exc))))
        self.outputs.put(Stop())
        self.output_thread.join(timeout=2.0)
        self.stopping.set()  # the input thread closes its own socket (sockets are not thread-safe)
        if self.input_thread is not None:
            self.input_thread.join(timeout=2.0)
        # Closing a socket does not flush it; terminating the context does (up to the linger).
        self.ctx.destroy(linger=1000)

    # ---- I/O threads ----

    def _input_loop(self, sock: zmq.Socket) -> None:
        """Receive and decode; for a new request, also hash its prompt's blocks for the prefix
        cache (about 1 µs a block), which the busy loop would otherwise do while scheduling it."""
        monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)
        try:
            self._receive(sock, monitor)
        except BaseException as exc:
            logger.exception("engine core input thread failed")
            self.inputs.put((IoThreadFailed("input", exc), None))
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _receive(self, sock: zmq.Socket, monitor: zmq.Socket) -> None:
        decoder = Decoder(EngineCoreInput, tensors=False)
        config = self.payload.config
        refused = RefusalLog(self.payload.input_address)
        while not self.stopping.is_set():
            while monitor.poll(0):  # peers refused at the handshake never reach the socket: log them
                if (failure := handshake_failure(monitor)) is not None:
                    refused.note(failure)
            if not sock.poll(IDLE_CHECK_S * 1000):
                continue
            frames = sock.recv_multipart(copy=False)
            block_hashes = None
            try:
                message = decoder.decode(frames)
                if isinstance(message, Hello):
                    check_output_address(message.output_address)
                if isinstance(message, EngineCoreRequest) and config.enable_prefix_caching:
                    block_hashes = prompt_block_hashes(message.prompt_token_ids, config.block_size, message.lora_id,
                                                       message.cache_salt, message.prompt_embedding_table)
            # garbage on the port, a peer of another version, a truncated or mistyped message, a
            # missing side frame, token ids beyond int64: the message fails, never the core
            except Exception as exc:
                logger.warning("dropped a malformed message (%d frames): %s: %s", len(frames), type(exc).__name__,
                               exc)
                continue
            if isinstance(message, Hello):  # connect now: heartbeats flow even while the model loads
                self.outputs.put(Connect(message.client_index, message.output_address))
            self.inputs.put((message, block_hashes))

    def _output_loop(self) -> None:
        try:
            self._send_outputs()
        except BaseException as exc:
            logger.exception("engine core output thread failed")
            self.inputs.put((IoThreadFailed("output", exc), None))

    def _send_outputs(self) -> None:
        """Carry out the busy loop's commands until Stop, and send a Heartbeat on every link that
        was quiet for HEARTBEAT_S."""
        encoder = Encoder()
        last_sent: dict[int, float] = {}

        def send(client: int, message) -> None:
            if (sock := self.output_sockets.get(client)) is not None:
                sock.send_multipart(encoder.encode(message), copy=False)
                last_sent[client] = time.monotonic()

        while True:
            try:
                command = self.outputs.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                command = None  # only heartbeats are due
            match command:
                case Send(client, message):
                    send(client, message)
                case Broadcast(message):
                    for client in list(self.output_sockets):
                        send(client, message)
                case Connect(client, address):
                    if client not in self.output_sockets:
                        self._connect(client, address)
                case Forget(client):
                    if (sock := self.output_sockets.pop(client, None)) is not None:
                        sock.close(linger=0)
                case Stop():
                    return
                case None:
                    pass
                case _:
                    raise TypeError(f"not an output command: {command!r}")
            now = time.monotonic()
            for client in list(self.output_sockets):
                if now - last_sent.get(client, 0.0) >= HEARTBEAT_S:
                    send(client, Heartbeat(client))

    def _connect(self, client: int, address: str) -> None:
        try:
            self.output_sockets[client] = make_socket(self.ctx, zmq.PUSH, address, bind=False, secret=self.secret,
                                                      curve_server=True)
        except zmq.ZMQError as exc:  # it never hears from us, and is forgotten after its silence
            logger.warning("cannot reach frontend %d at %s: %s", client, address, exc)


def death_reason(exc: BaseException) -> str:
    """The core's last word (`EngineDead.reason`) for the exception that ends it."""
    if isinstance(exc, SystemExit | KeyboardInterrupt):
        return "engine core was shut down"
    return "".join(traceback.format_exception_only(exc)).strip()


def prompt_table_problem(message: EngineCoreRequest, hidden_size: int) -> str | None:
    """Why a request's prompt-tuning table cannot run, or None."""
    table = message.prompt_embedding_table
    if table is None:
        return None
    if message.sampling_params.prompt_logprobs is not None:
        return "prompt_logprobs cannot be computed for a prompt with a prompt_embedding_table"
    return table.problem(hidden_size)


def out_of_vocabulary(message: EngineCoreRequest, vocab_size: int) -> str | None:
    """Why a request's token ids do not fit the model (the workers would fail on them), or None.
    Prompt ids past the vocabulary index its prompt-tuning table, if it has one."""
    params = message.sampling_params
    table = message.prompt_embedding_table
    fields = [("prompt_token_ids", message.prompt_token_ids, vocab_size + (table.shape[0] if table else 0)),
              ("stop_token_ids and eos_token_id", params.all_stop_token_ids, vocab_size),
              ("allowed_token_ids", params.allowed_token_ids or (), vocab_size),
              ("logit_bias", list(params.logit_bias or ()), vocab_size),
              ("bad_words", [t for ids in params.bad_words_token_ids or () for t in ids], vocab_size),
              ("draft_token_ids", params.draft_token_ids or (), vocab_size)]
    for name, ids, limit in fields:
        if ids and (min(ids) < 0 or max(ids) >= limit):
            bad = [t for t in ids if not 0 <= t < limit]
            return f"{name} must hold token ids in [0, {limit}), got {bad[:8]}"
    return None


def run_headless(config: EngineConfig, address: str) -> int:
    """`conveyor serve --headless`: this process is the engine core (its workers are its children),
    serving frontends that connect to `address` from any host, until SIGINT or SIGTERM. Beyond
    loopback, `config.engine_secret` is required (ValueError)."""
    check_engine_secret(address, config.engine_secret)
    ipc_dir = new_ipc_dir()  # for the workers' sockets
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    proc = None
    try:
        proc = EngineCoreProc(CorePayload(config, address, None, ipc_dir))
        logger.info("engine core ready: frontends connect to %s%s", address,
                    " with the engine secret (CurveZMQ)" if proc.secret else "")
        proc.run()
    except (SystemExit, KeyboardInterrupt):
        return 0
    except Exception as exc:
        logger.error("engine core failed: %s", summarize_failure(str(exc)))
        return 1
    finally:
        if proc is not None:
            proc.core.shutdown()
        remove_ipc_dir(ipc_dir)
    return 0


def core_main() -> None:
    # A parent that dies without shutting us down cannot remove its ipc files: we do.
    payload: CorePayload = read_payload(CorePayload, on_parent_death=lambda p: remove_ipc_dir(p.ipc_dir))
    logging.basicConfig(level=os.environ.get("CONVEYOR_LOG_LEVEL", "WARNING"))
    proc = None
    try:
        proc = EngineCoreProc(payload)
        proc.run()
    except SystemExit:
        pass
    except BaseException as exc:
        if proc is None and payload.output_address is None:  # no spawning frontend to tell why (the launcher's core)
            logger.error("engine core failed to start: %s", summarize_failure(death_reason(exc)))
        os._exit(1)
    finally:
        if proc is not None:
            proc.core.shutdown()
    os._exit(0)


if __name__ == "__main__":
    run_child(core_main)
