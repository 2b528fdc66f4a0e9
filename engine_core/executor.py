"""The core's handle on its workers: starts one process per tensor-parallel rank, broadcasts each
step to all of them, and collects rank 0's result, noticing at once when a worker dies."""

import os
import subprocess
import time

import zmq

from conveyor.config import EngineConfig
from conveyor.ipc.messages import (
    ModelRunnerOutput,
    SchedulerOutput,
    Shutdown,
    WorkerCall,
    WorkerError,
    WorkerOutput,
    WorkerPayload,
    WorkerReady,
    WorkerResult,
)
from conveyor.ipc.process import describe_exit, spawn, terminate
from conveyor.ipc.serial import Decoder, Encoder
from conveyor.ipc.sockets import ipc_address, make_socket

POLL_MS = 50
# Spin-loop iterations an idle OpenMP thread of a worker busy-waits before it sleeps. libgomp's
# default, 300,000, keeps every core busy between steps and starves the frontend and the core that
# share them (stalls of up to 0.9 s on a tiny model); 10,000 still spans the gaps inside a forward.
# Measured in docs/benchmarks.md.
OMP_SPIN_COUNT = 10_000


def worker_env() -> dict[str, str]:
    """The OpenMP setting workers get, unless the user chose their own."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return {}
    return {"GOMP_SPINCOUNT": str(OMP_SPIN_COUNT)}


class WorkerFailure(RuntimeError):
    pass


class Executor:
    def __init__(self, config: EngineConfig, ipc_dir: str, startup_timeout: float = 600.0):
        self.config = config
        self.ctx = zmq.Context(1)
        self.encoder, self.decoder = Encoder(), Decoder(WorkerOutput)
        self.results = make_socket(self.ctx, zmq.PULL, ipc_address(ipc_dir, "worker-out"), bind=True)
        self.inputs: list[zmq.Socket] = []
        self.workers: list[subprocess.Popen] = []
        dist_init_file = os.path.join(ipc_dir, "dist-init")
        for rank in range(config.tensor_parallel_size):
            address = ipc_address(ipc_dir, f"worker-in-{rank}")
            self.inputs.append(make_socket(self.ctx, zmq.PUSH, address, bind=True))
            payload = WorkerPayload(config, rank, address, self.results.getsockopt_string(zmq.LAST_ENDPOINT),
                                    dist_init_file)
            self.workers.append(spawn("conveyor.gpu_worker.worker", payload, f"worker-{rank}", env=worker_env()))
        ready = [self._receive(WorkerReady, startup_timeout) for _ in self.workers]
        self.num_blocks = min(r.num_gpu_blocks for r in ready)
        self.max_model_len = ready[0].max_model_len
        self.device_type = ready[0].device_type

    def collective_call(self, method: str, *args, timeout: float = 600.0) -> list:
        self._broadcast(WorkerCall(method, list(args)))
        return [self._receive(WorkerResult, timeout).result for _ in self.workers]

    def submit(self, step: SchedulerOutput) -> None:
        """Queue a step on every worker; they run steps in the order submitted."""
        self._broadcast(step)

    def collect(self) -> ModelRunnerOutput:
        """The result of the oldest step submitted and not yet collected."""
        return self._receive(ModelRunnerOutput)

    def _broadcast(self, message) -> None:
        frames = self.encoder.encode(message)
        for sock in self.inputs:
            sock.send_multipart(frames)

    def _receive(self, expected: type, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.results.poll(POLL_MS):
            self.check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerFailure(f"workers did not answer within {timeout:.0f} s")
        message = self.decoder.decode(self.results.recv_multipart(copy=False))
        if isinstance(message, WorkerError):
            raise WorkerFailure(f"worker rank {message.rank} failed:\n{message.error}")
        if not isinstance(message, expected):
            raise WorkerFailure(f"expected {expected.__name__} from a worker, got {type(message).__name__}")
        return message

    def check_alive(self) -> None:
        for rank, proc in enumerate(self.workers):
            if proc.poll() is not None:
                # A worker that failed cleanly sent its traceback first: give it a moment to land.
                if self.results.poll(200):
                    message = self.decoder.decode(self.results.recv_multipart(copy=False))
                    if isinstance(message, WorkerError):
                        raise WorkerFailure(f"worker rank {message.rank} failed:\n{message.error}")
                raise WorkerFailure(describe_exit(f"worker rank {rank}", proc.returncode))

    def shutdown(self) -> None:
        try:
            self._broadcast(Shutdown())
        except zmq.ZMQError:
            pass
        for proc in self.workers:
            terminate(proc, timeout=5.0)
        self.ctx.destroy(linger=0)
