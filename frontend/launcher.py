"""Multi-process serving: `conveyor serve --api-server-count K` and `conveyor serve --headless`.

With K API servers, this process is only a supervisor. It binds the HTTP port once, starts the
engine core (listening on a private ipc:// address), and starts K API-server processes that each
connect to the core as a frontend of their own and accept connections from the shared listening
socket (the kernel spreads them). Tokenizing, detokenizing and HTTP thus scale over K processes
while one core batches everything.

SIGINT/SIGTERM: each API server stops accepting and lets its requests finish within
--shutdown-timeout, then the core stops. If any child dies on its own, the rest are stopped too
and the exit status is non-zero.
"""

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from conveyor.config import EngineConfig, resolve_max_model_len
from conveyor.frontend.api_server import run_server
from conveyor.frontend.args import engine_args, startup_failure
from conveyor.ipc.messages import ApiServerPayload, CorePayload
from conveyor.ipc.process import describe_exit, kill_process_group, read_payload, run_child, spawn, terminate
from conveyor.ipc.sockets import ipc_address, new_ipc_dir, remove_ipc_dir

logger = logging.getLogger(__name__)

SUPERVISE_S = 0.2  # how often the supervisor checks its children


def serve(args: argparse.Namespace) -> int:
    """`conveyor serve`: one API server with an engine of its own, or for the core at
    --engine-address; K of them (--api-server-count); or only the core (--headless)."""
    if args.headless:
        return run_headless(args)
    address = args.engine_address
    if address is not None and "://" not in address:
        address = f"tcp://{address}"
    if args.api_server_count > 1:
        return run_api_servers(args, address)
    return run_server(args, engine_address=address)


def engine_config(args: argparse.Namespace, own_core: bool = True) -> EngineConfig:
    """The engine arguments and the model's config, checked before any process starts (the limits
    only for a core of our `own_core`: another core has its own)."""
    config = EngineConfig(**engine_args(args))
    hf_config = config.load_hf_config()  # imports transformers, torch (seconds): a lone server starts its engine first
    if own_core:
        resolve_max_model_len(config, hf_config)  # a bad limit fails here, not in a worker
    return config


def run_headless(args: argparse.Namespace) -> int:
    """The engine core and its workers only, listening at tcp://HOST:ENGINE_PORT for frontends
    (`conveyor serve --engine-address HOST:ENGINE_PORT`, or `AsyncLLM(engine_address=...)`)."""
    from conveyor.engine_core.engine_core import run_headless as run_core  # the core's modules: only where it runs

    try:  # run_core logs the core's own failure; bad arguments and model files raise
        return run_core(engine_config(args), f"tcp://{args.host}:{args.engine_port}")
    except Exception as exc:
        return startup_failure("serve", exc)


def run_api_servers(args: argparse.Namespace, engine_address: str | None = None) -> int:
    """K API servers on one port; with `engine_address`, for the core running there, else for a
    core of their own that this process starts."""
    try:  # before anything starts: a bad model directory, argument or port fails here, in one line
        config = engine_config(args, own_core=engine_address is None)
        listener = socket.create_server((args.host, args.port))
    except Exception as exc:
        return startup_failure("serve", exc)
    stopping = False

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    ipc_dir = new_ipc_dir()
    children: dict[str, subprocess.Popen] = {}
    if engine_address is None:
        engine_address = ipc_address(ipc_dir, "core-in")
        children["engine core"] = spawn("conveyor.engine_core.engine_core",
                                        CorePayload(config, engine_address, None, ipc_dir),
                                        "engine-core", new_process_group=True)
    server_args = passed_arguments(args)
    metrics_dir = os.path.join(ipc_dir, "metrics")  # /metrics of any server sums them all
    os.mkdir(metrics_dir)
    servers = [
        spawn("conveyor.frontend.launcher", ApiServerPayload(server_args, engine_address, listener.fileno(), ipc_dir),
              f"api-server-{i}", pass_fds=(listener.fileno(),), env={"PROMETHEUS_MULTIPROC_DIR": metrics_dir})
        for i in range(args.api_server_count)
    ]
    children.update((f"API server {i}", proc) for i, proc in enumerate(servers))
    host, port = listener.getsockname()[:2]
    listener.close()  # the servers hold it now
    logger.info("%d API servers running on http://%s:%d, sharing the engine core at %s", len(servers), host,
                port, engine_address)
    crashed = []
    while not stopping and not crashed:
        time.sleep(SUPERVISE_S)
        crashed = [(name, proc) for name, proc in children.items() if proc.poll() is not None]
    for name, proc in crashed:
        logger.error("%s; stopping the others", describe_exit(name, proc.returncode))
    stop_servers(servers, args.shutdown_timeout)
    core = children.get("engine core")
    if core is not None:
        terminate(core, timeout=5.0)
        kill_process_group(core)
    remove_ipc_dir(ipc_dir)
    failed = crashed or any(proc.returncode != 0 for proc in servers)
    return 1 if failed else 0


def passed_arguments(args: argparse.Namespace) -> dict:
    """The parsed `conveyor serve` arguments an API-server process gets: every value the command
    line can give (scalars, and lists of them from repeatable options)."""
    def passes(value) -> bool:
        if isinstance(value, list):
            return all(passes(item) for item in value)
        return isinstance(value, str | int | float | bool | None)

    return {name: value for name, value in vars(args).items() if passes(value)}


def stop_servers(servers: list[subprocess.Popen], shutdown_timeout: float) -> None:
    """SIGTERM the servers still running, so that they drain their requests and exit; kill any
    still there `shutdown_timeout` + 10 seconds later."""
    for proc in servers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + shutdown_timeout + 10.0
    for proc in servers:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def api_server_main() -> None:
    """One API server of the supervisor above: serve on the inherited socket until SIGTERM. If the
    supervisor dies, the lifeline removes the supervisor's directory as well as this server's own."""
    payload: ApiServerPayload = read_payload(ApiServerPayload, on_parent_death=lambda p: remove_ipc_dir(p.ipc_dir))
    args = argparse.Namespace(**payload.args)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s [pid {os.getpid()}] "
                                                               "%(name)s: %(message)s")
    listener = socket.socket(fileno=payload.listen_fd)
    try:
        status = run_server(args, engine_address=payload.engine_address, sockets=[listener])
    except SystemExit as exc:  # SIGTERM while the engine started (run_child's handler)
        status = exc.code if isinstance(exc.code, int) else 1
    # os._exit: a normal exit would finalize the interpreter under the lifeline thread's stdin read.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run_child(api_server_main)
