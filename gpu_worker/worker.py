"""A worker process: one tensor-parallel rank. Loads its weight shard, holds its KV cache, and runs
every step the core broadcasts; rank 0 returns the sampled tokens."""

import logging
import os
import time
import traceback

import torch

from conveyor.config import bind_process
from conveyor.ipc.messages import (
    SchedulerOutput,
    Shutdown,
    WorkerCall,
    WorkerError,
    WorkerInput,
    WorkerPayload,
    WorkerReady,
    WorkerResult,
)
from conveyor.ipc.process import freeze_startup_objects, read_payload, run_child
from conveyor.ipc.serial import Decoder, Encoder
from conveyor.ipc.shm_ring import RingTimeout, ShmRing, ring_spin_s

logger = logging.getLogger(__name__)


def init_distributed(payload: WorkerPayload, device: torch.device) -> None:
    from conveyor.gpu_worker.parallel import init_tensor_parallel

    size = payload.config.tensor_parallel_size
    if size > 1:
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{payload.dist_init_file}",
                                rank=payload.rank, world_size=size)
    init_tensor_parallel(payload.rank, size)


def run_steps(runner, inputs: ShmRing, outputs: ShmRing, spin_s: float, rank: int) -> None:
    """Run steps and calls until Shutdown. A step's `model_time` is its whole `execute_model`."""
    encoder, decoder = Encoder(), Decoder(WorkerInput)
    while True:
        message = decoder.decode(inputs.recv(spin_s=spin_s))
        if isinstance(message, SchedulerOutput):
            start = time.perf_counter()
            result = runner.execute_model(message)
            result.model_time = time.perf_counter() - start
            if rank == 0:
                outputs.send(encoder.encode(result))
        elif isinstance(message, WorkerCall):
            result = getattr(runner, message.method)(*message.args)
            outputs.send(encoder.encode(WorkerResult(result)))
        elif isinstance(message, Shutdown):
            return


def remove_empty_ring_dir(payload: WorkerPayload) -> None:
    """The core died without its cleanup (SIGKILL): remove its directory if nothing is left in it.
    A headless core's holds only the rings, unlinked at the handshake; a frontend's still holds its
    sockets, and stays until the frontend removes it."""
    os.rmdir(os.path.dirname(payload.input_ring))


def worker_main() -> None:
    payload: WorkerPayload = read_payload(WorkerPayload, on_parent_death=remove_empty_ring_dir)
    config, rank = payload.config, payload.rank
    logging.basicConfig(level=os.environ.get("CONVEYOR_LOG_LEVEL", "WARNING"))
    inputs, outputs = ShmRing(payload.input_ring), ShmRing(payload.output_ring)
    encoder = Encoder()
    try:
        device = torch.device(config.resolved_device())
        if device.type == "cpu" and (cpus := config.worker_cpus(rank)) is not None:
            bind_process(cpus, f"worker rank {rank}")  # before torch starts its OpenMP threads
        torch.set_num_threads(config.resolved_worker_threads())
        if device.type == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        init_distributed(payload, device)

        from conveyor.gpu_worker.model_runner import ModelRunner

        runner = ModelRunner(config, device)
        freeze_startup_objects()  # the model's objects never become garbage
        outputs.send(encoder.encode(WorkerReady(rank, runner.determine_num_blocks(), runner.max_model_len,
                                                device.type, runner.hf_config.vocab_size,
                                                runner.hf_config.hidden_size)))
        with torch.inference_mode():
            run_steps(runner, inputs, outputs, ring_spin_s(config.has_spare_cpus(device.type)), rank)
    except Exception:
        error = traceback.format_exc()
        try:
            outputs.send(encoder.encode(WorkerError(rank, error)), timeout=1.0)
            logger.debug("worker rank %d failed:\n%s", rank, error)  # the core reports it
        except RingTimeout:  # the core stopped reading: it learns of the death from the exit status
            logger.error("worker rank %d failed:\n%s", rank, error)
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    run_child(worker_main)
