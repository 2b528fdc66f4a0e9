"""ZeroMQ socket helpers: the only place that builds sockets and endpoint names."""

import os
import shutil
import tempfile
import uuid

import zmq


def new_ipc_dir() -> str:
    return tempfile.mkdtemp(prefix="conveyor-")


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
