"""The engine-core process: a busy loop of schedule -> run on workers -> update -> emit outputs.

Socket reads and msgpack decoding run on an input thread, encoding and socket writes on an output
thread, so the loop itself only schedules. It blocks (never spins) while there is no work.
"""

import logging
import os
import queue
import threading
import time
import traceback

import msgspec
import zmq

from conveyor.config import EngineConfig
from conveyor.engine_core.executor import Executor
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
    Hello,
    UtilityCall,
    UtilityResult,
)
from conveyor.ipc.process import read_payload, run_child
from conveyor.ipc.serial import Decoder, Encoder
from conveyor.ipc.sockets import make_socket, remove_ipc_dir

logger = logging.getLogger(__name__)

IDLE_CHECK_S = 0.5  # how often an idle core checks that its workers are alive


class EngineCore:
    """Scheduler plus executor, with no sockets: one call of `step` is one model step."""

    def __init__(self, config: EngineConfig, ipc_dir: str, max_model_len: int):
        self.config = config
        self.executor = Executor(config, ipc_dir)
        self.executor.collective_call("init_kv_cache", self.executor.num_blocks)
        self.scheduler = Scheduler(config, self.executor.num_blocks, max_model_len)
        self.last_step_time = 0.0
        self.last_model_time = 0.0
        self.num_steps = 0
        self.total_step_time = 0.0
        self.total_model_time = 0.0

    def add_request(self, message: EngineCoreRequest) -> EngineCoreOutput | None:
        """Queue a request, or return the error output of one that can never run."""
        params = message.sampling_params
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.scheduler.max_model_len - len(message.prompt_token_ids)
        error = None
        if not message.prompt_token_ids:
            error = "prompt must contain at least one token"
        elif max_tokens < 1:
            error = self.scheduler.check_fits(len(message.prompt_token_ids), 1)
        else:
            error = self.scheduler.check_fits(len(message.prompt_token_ids), max_tokens)
        if error is not None:
            return EngineCoreOutput(message.request_id, [], finish_reason="error", error=error)
        self.scheduler.add_request(Request(
            request_id=message.request_id,
            prompt_token_ids=message.prompt_token_ids,
            sampling_params=params,
            client_index=message.client_index,
            arrival_time=message.arrival_time,
            priority=message.priority,
            lora_id=message.lora_id,
            cache_salt=message.cache_salt,
            max_tokens=max_tokens,
        ))
        return None

    def abort(self, request_ids: list[str]) -> list[Request]:
        return self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def step(self) -> list[tuple[Request, EngineCoreOutput]]:
        start = time.perf_counter()
        step = self.scheduler.schedule()
        if not step.num_scheduled_tokens:
            return []
        result = self.executor.execute(step)
        outputs = self.scheduler.update_from_output(result)
        self.last_model_time = result.model_time
        self.last_step_time = time.perf_counter() - start
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
        return self.scheduler.kv.reset_prefix_cache()

    def call_ping(self) -> str:
        return "pong"

    def shutdown(self) -> None:
        self.executor.shutdown()


class EngineCoreProc:
    """EngineCore behind sockets: the process's busy loop and its two I/O threads."""

    def __init__(self, payload: CorePayload):
        self.payload = payload
        self.ctx = zmq.Context(1)
        self.inputs: queue.Queue = queue.Queue()
        self.outputs: queue.Queue = queue.Queue()
        self.output_sockets: dict[int, zmq.Socket] = {}
        self.output_thread = threading.Thread(target=self._output_loop, daemon=True, name="core-output")
        self.output_thread.start()
        self.outputs.put((0, Hello(0, payload.output_address)))
        try:
            self.core = EngineCore(payload.config, payload.ipc_dir, payload.max_model_len)
        except BaseException as exc:
            self._die(exc)
            raise
        self.outputs.put((0, EngineReady(payload.max_model_len, self.core.executor.num_blocks)))
        self.clients = {0}
        threading.Thread(target=self._input_loop, daemon=True, name="core-input").start()

    def run(self) -> None:
        try:
            while True:
                self._process_inputs(block=not self.core.scheduler.has_unfinished())
                outputs = self.core.step()
                if outputs:
                    self._emit(outputs)
        except BaseException as exc:
            self._die(exc)
            raise

    def _process_inputs(self, block: bool) -> None:
        while True:
            try:
                if block:
                    message = self.inputs.get(timeout=IDLE_CHECK_S)
                    block = False
                else:
                    message = self.inputs.get_nowait()
            except queue.Empty:
                if block:
                    self.core.executor.check_alive()
                    continue
                return
            self._handle(message)

    def _handle(self, message) -> None:
        if isinstance(message, EngineCoreRequest):
            error = self.core.add_request(message)
            if error is not None:
                self._send(message.client_index, [error])
        elif isinstance(message, Abort):
            self.core.abort(message.request_ids)
        elif isinstance(message, Hello):
            self.clients.add(message.client_index)
            self.outputs.put((message.client_index, message))
        elif isinstance(message, UtilityCall):
            try:
                result = UtilityResult(message.call_id, getattr(self.core, f"call_{message.method}")(*message.args))
            except Exception as exc:  # a bad call fails alone
                result = UtilityResult(message.call_id, error=f"{type(exc).__name__}: {exc}")
            self.outputs.put((message.client_index, result))

    def _emit(self, outputs) -> None:
        by_client: dict[int, list[EngineCoreOutput]] = {}
        for request, output in outputs:
            by_client.setdefault(request.client_index, []).append(output)
        for client, client_outputs in by_client.items():
            self._send(client, client_outputs)

    def _send(self, client: int, outputs: list[EngineCoreOutput]) -> None:
        stats = self.core.stats()
        self.outputs.put((client, EngineCoreOutputs(outputs, time.time(), stats)))

    def _die(self, exc: BaseException) -> None:
        if isinstance(exc, SystemExit | KeyboardInterrupt):
            reason = "engine core was shut down"
        else:
            reason = "".join(traceback.format_exception_only(exc)).strip()
            logger.error("engine core failed:\n%s", traceback.format_exc())
        for client in list(self.output_sockets) or [0]:
            self.outputs.put((client, EngineDead(reason)))
        self.outputs.put(None)
        self.output_thread.join(timeout=2.0)
        # Closing a socket does not flush it; terminating the context does (up to the linger).
        self.ctx.destroy(linger=1000)

    # ---- I/O threads ----

    def _input_loop(self) -> None:
        decoder = Decoder(EngineCoreInput)
        sock = make_socket(self.ctx, zmq.PULL, self.payload.input_address, bind=True)
        while True:
            self.inputs.put(decoder.decode(sock.recv_multipart(copy=False)))

    def _output_loop(self) -> None:
        encoder = Encoder()
        while (item := self.outputs.get()) is not None:
            client, message = item
            if isinstance(message, Hello):
                self.output_sockets[client] = make_socket(self.ctx, zmq.PUSH, message.output_address, bind=False)
                continue
            sock = self.output_sockets.get(client)
            if sock is not None:
                sock.send_multipart(encoder.encode(message), copy=False)


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
    except BaseException:
        os._exit(1)
    finally:
        if proc is not None:
            proc.core.shutdown()
    os._exit(0)


if __name__ == "__main__":
    run_child(core_main)
