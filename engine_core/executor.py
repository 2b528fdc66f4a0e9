"""The core's handle on its workers: starts one process per tensor-parallel rank, broadcasts each
step to all of them, and collects rank 0's result, noticing at once when a worker dies. Each rank
has a shared-memory ring each way (ipc/shm_ring.py): steps and calls in, results and errors out.

A worker that does not answer in time (a step: `step_timeout`) has hung: every worker is killed,
as none can be trusted to finish what it holds, and `WorkerFailure` names the hung rank. So does
a malformed message from a worker: the engine cannot drop a step's result and go on."""

import os
import subprocess

import msgspec

from conveyor.config import EngineConfig, bind_process
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
from conveyor.ipc.process import describe_exit, is_stopped, spawn, terminate
from conveyor.ipc.serial import Decoder, Encoder
from conveyor.ipc.shm_ring import RingTimeout, ShmRing, ring_spin_s

# Spin-loop iterations an idle OpenMP thread of a worker busy-waits before it sleeps. libgomp's
# default, 300,000, keeps every CPU busy between steps and starves the frontend and the engine core
# that share them; 10,000 still spans the gaps inside a forward (docs/benchmarks.md, "Frontend
# stalls and the workers' OpenMP spin").
OMP_SPIN_COUNT = 10_000


def worker_env() -> dict[str, str]:
    """The OpenMP setting workers get, unless the user chose their own."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return {}
    return {"GOMP_SPINCOUNT": str(OMP_SPIN_COUNT)}


class WorkerFailure(RuntimeError):
    @classmethod
    def reported(cls, error: WorkerError) -> "WorkerFailure":
        """A worker's report of the exception that ends it, traceback included."""
        return cls(f"worker rank {error.rank} failed:\n{error.error}")


class Executor:
    def __init__(self, config: EngineConfig, ipc_dir: str, startup_timeout: float = 600.0):
        self.config = config
        self.encoder, self.decoder = Encoder(), Decoder(WorkerOutput)
        self.inputs: list[ShmRing] = []
        self.results: list[ShmRing] = []
        self.workers: list[subprocess.Popen] = []
        self.spin_s = 0.0  # how long a wait for a result spins before it sleeps (ipc/shm_ring.py)
        dist_init_file = os.path.join(ipc_dir, "dist-init")
        for rank in range(config.tensor_parallel_size):
            self.inputs.append(ShmRing(os.path.join(ipc_dir, f"worker-in-{rank}"), create=True))
            self.results.append(ShmRing(os.path.join(ipc_dir, f"worker-out-{rank}"), create=True))
            payload = WorkerPayload(config, rank, self.inputs[rank].path, self.results[rank].path, dist_init_file)
            self.workers.append(spawn("conveyor.gpu_worker.worker", payload, f"worker-{rank}", env=worker_env()))
        ready = [self._receive(WorkerReady, startup_timeout, rank, "start") for rank in range(len(self.workers))]
        for ring in self.inputs + self.results:
            ring.unlink()  # every worker has them open by now
        self.num_blocks = min(r.num_gpu_blocks for r in ready)
        self.max_model_len = ready[0].max_model_len
        self.device_type = ready[0].device_type
        self.vocab_size = ready[0].vocab_size
        self.hidden_size = ready[0].hidden_size
        self.spin_s = ring_spin_s(config.has_spare_cpus(self.device_type))
        if self.device_type == "cpu" and (cpus := config.engine_core_cpus()) is not None:
            bind_process(cpus, "the engine core")  # off the workers' CPUs, which are bound already

    def collective_call(self, method: str, *args, timeout: float = 600.0) -> list:
        self._broadcast(WorkerCall(method, list(args)))
        return [self._receive(WorkerResult, timeout, rank, method).result for rank in range(len(self.workers))]

    def submit(self, step: SchedulerOutput) -> None:
        """Queue a step on every worker; they run steps in the order submitted."""
        self._broadcast(step)

    def collect(self) -> ModelRunnerOutput:
        """The result of the oldest step submitted and not yet collected."""
        return self._receive(ModelRunnerOutput, self.config.step_timeout, 0, "a step", " (step_timeout)")

    def _broadcast(self, message) -> None:
        frames = self.encoder.encode(message)
        for ring in self.inputs:
            ring.send(frames, alive=self.check_alive)

    def _receive(self, expected: type, timeout: float, rank: int, what: str, setting: str = ""):
        try:
            frames = self.results[rank].recv(timeout, alive=self.check_alive, spin_s=self.spin_s)
        except RingTimeout:  # it stopped in the middle of its answer
            frames = None
        if frames is None:
            raise self._hung(f"no answer to {what} within {timeout:g} s{setting}")
        try:
            message = self.decoder.decode(frames)
        except (msgspec.DecodeError, ValueError) as exc:
            self.kill()
            raise WorkerFailure(f"worker rank {rank} sent a malformed message: {exc}") from None
        if isinstance(message, WorkerError):
            raise WorkerFailure.reported(message)
        if not isinstance(message, expected):
            raise WorkerFailure(f"expected {expected.__name__} from a worker, got {type(message).__name__}")
        return message

    def _hung(self, what: str) -> WorkerFailure:
        """Kill the workers; the error names the ranks that hung: those stopped (SIGSTOP, a
        debugger), else all (rank 0 answers for every rank, and one that hangs holds the others
        at their next collective)."""
        stopped = [rank for rank, proc in enumerate(self.workers) if is_stopped(proc.pid)]
        ranks = stopped or list(range(len(self.workers)))
        self.kill()
        who = f"worker rank {ranks[0]}" if len(ranks) == 1 else f"worker ranks {', '.join(map(str, ranks))}"
        return WorkerFailure(f"{who} hung{' (stopped)' if stopped else ''}: {what}")

    def kill(self) -> None:
        for proc in self.workers:
            proc.kill()

    def check_alive(self) -> None:
        for rank, proc in enumerate(self.workers):
            if proc.poll() is not None:
                # A worker that failed cleanly sent its traceback last, after any results.
                try:
                    while (frames := self.results[rank].recv(0.2, spin_s=0.0)) is not None:
                        if isinstance(message := self.decoder.decode(frames), WorkerError):
                            raise WorkerFailure.reported(message)
                except (RingTimeout, msgspec.DecodeError, ValueError):
                    pass  # it died in the middle of a message
                raise WorkerFailure(describe_exit(f"worker rank {rank}", proc.returncode))

    def shutdown(self) -> None:
        try:
            self._broadcast(Shutdown())
        except (RingTimeout, WorkerFailure):
            pass
        for proc in self.workers:
            terminate(proc, timeout=5.0)
        for ring in self.inputs + self.results:
            ring.close()
