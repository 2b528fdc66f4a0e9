"""ZeroMQ socket helpers: the only place that builds sockets and endpoint names."""

import os
import shutil
import socket
import tempfile
import uuid

import zmq

# Links without a process handle on the far side (a core on another host, frontends in other
# processes) carry a Heartbeat whenever they have been quiet this long...
HEARTBEAT_S = 0.5
# ...and the far side counts as dead after this much silence.
PEER_TIMEOUT_S = float(os.environ.get("CONVEYOR_PEER_TIMEOUT_S", "10"))


def ipc_root() -> str:
    """Where engines make their private directories: /dev/shm where there is one, as a ring's pages
    must live in memory (tmpfs), not in a file system that writes them back."""
    shm = "/dev/shm"
    return shm if os.access(shm, os.W_OK) else tempfile.gettempdir()


def new_ipc_dir() -> str:
    """A private directory for sockets and shared-memory rings."""
    return tempfile.mkdtemp(prefix="conveyor-", dir=ipc_root())


def remove_ipc_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def ipc_address(directory: str, name: str) -> str:
    """A fresh ipc:// endpoint inside `directory` (unique per call: no fixed names)."""
    return f"ipc://{os.path.join(directory, f'{name}-{uuid.uuid4().hex[:8]}')}"


def make_socket(ctx: zmq.Context, kind: int, address: str, bind: bool, identity: bytes | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if bind:
        if address.startswith("tcp://") and address.endswith(":0"):
            sock.bind(address.removesuffix(":0") + ":*")  # zmq picks a free port
        else:
            sock.bind(address)
    else:
        sock.connect(address)
    return sock


def bound_address(sock: zmq.Socket) -> str:
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def check_output_address(address: str) -> None:
    """A frontend's output address, as its Hello names it: the core connects there."""
    if not address.startswith(("tcp://", "ipc://")) or len(address) <= 6:
        raise ValueError(f"output_address must be tcp://HOST:PORT or ipc://PATH, got {address!r}")


def output_address_toward(engine_address: str, directory: str | None) -> str:
    """Where a frontend should bind its output socket so that the core at `engine_address` can
    connect to it: ipc in `directory` for a local core (ipc://), else tcp on the interface that
    routes to the core's host (any free port)."""
    if engine_address.startswith("ipc://"):
        assert directory is not None, "an ipc:// core needs a directory for our socket"
        return ipc_address(directory, "out")
    if not engine_address.startswith("tcp://"):
        raise ValueError(f"engine_address must be tcp://HOST:PORT or ipc://PATH, got {engine_address!r}")
    host = engine_address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # no packet is sent: this only asks the kernel for the route
        local = probe.getsockname()[0]
    return f"tcp://{local}:0"
