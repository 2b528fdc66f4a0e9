"""ZeroMQ socket helpers: the only place that builds sockets and endpoint names.

Links over tcp can be secured with a secret shared by the core and its frontends: every socket of
such a link then runs CurveZMQ (authenticated, encrypted), the core as its server and frontends as
its clients, whichever side binds. Both sides derive the server's key pair from the secret, and a
client cannot open the handshake without the server's public key, which is never sent: a peer
without the secret is refused before any message of it reaches the core, and nobody without it
can forge a message to a frontend. ipc:// links need no secret: they live in a private directory.
"""

import functools
import hashlib
import ipaddress
import os
import shutil
import socket
import tempfile
import uuid

import zmq
import zmq.utils.z85
from zmq.utils.monitor import recv_monitor_message

# Links without a process handle on the far side (a core on another host, frontends in other
# processes) carry a Heartbeat whenever they have been quiet this long...
HEARTBEAT_S = 0.5
# ...and the far side counts as dead after this much silence.
PEER_TIMEOUT_S = float(os.environ.get("CONVEYOR_PEER_TIMEOUT_S", "10"))
# Socket-monitor events of a peer that failed the handshake (no secret, another one, not ZMTP).
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def ipc_root() -> str:
    """Where engines make their private directories: /dev/shm where there is one, as a ring's pages
    must live in memory (tmpfs), not in a file system that writes them back."""
    shm = "/dev/shm"
    return shm if os.access(shm, os.W_OK) else tempfile.gettempdir()


_own_dirs: set[str] = set()  # made by this process and not removed yet


def new_ipc_dir() -> str:
    """A private directory for sockets and shared-memory rings."""
    path = tempfile.mkdtemp(prefix="conveyor-", dir=ipc_root())
    _own_dirs.add(path)
    return path


def remove_ipc_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
        _own_dirs.discard(path)


def remove_own_ipc_dirs() -> None:
    """Every directory this process made and has not removed (for a child whose parent died)."""
    for path in list(_own_dirs):
        remove_ipc_dir(path)


def ipc_address(directory: str, name: str) -> str:
    """A fresh ipc:// endpoint inside `directory` (unique per call: no fixed names)."""
    return f"ipc://{os.path.join(directory, f'{name}-{uuid.uuid4().hex[:8]}')}"


def make_socket(ctx: zmq.Context, kind: int, address: str, bind: bool, identity: bytes | None = None,
                secret: str | None = None, curve_server: bool = False) -> zmq.Socket:
    """With `secret`, the socket runs CurveZMQ: as the link's server (the core) or its client."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if secret is not None:
        server_public, server_secret = curve_keys(secret)
        if curve_server:
            sock.curve_server = True
            sock.curve_secretkey = server_secret
        else:
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = server_public
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


def is_loopback(address: str) -> bool:
    """Whether a tcp:// address names this host only (127.0.0.0/8, ::1, localhost)."""
    host = address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or * (every interface)


def check_engine_secret(address: str, secret: str | None) -> None:
    """A core's tcp link beyond loopback needs a secret: anyone who reaches the port could otherwise
    drive the engine (and make its workers import logits processors)."""
    if secret is None and address.startswith("tcp://") and not is_loopback(address):
        raise ValueError(f"engine_secret must be set for an engine link beyond loopback ({address}): give the "
                         "core and its frontends the same --engine-secret or $CONVEYOR_ENGINE_SECRET")


@functools.cache
def curve_keys(secret: str) -> tuple[bytes, bytes]:
    """The link server's CurveZMQ key pair (public, secret; z85), derived from the shared secret
    slowly, so that a recorded handshake does not let anyone try guesses at it quickly."""
    seed = hashlib.pbkdf2_hmac("sha256", secret.encode(), b"conveyor engine link", 200_000)
    server_secret = zmq.utils.z85.encode(seed)
    return zmq.curve_public(server_secret), server_secret


def handshake_failure(monitor: zmq.Socket) -> str | None:
    """Read one event of a HANDSHAKE_FAILED monitor: what failed, or None for another event."""
    event = recv_monitor_message(monitor)
    if not event["event"] & HANDSHAKE_FAILED:
        return None
    cause = event["value"] if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else event["event"]
    detail = getattr(cause, "name", None) or str(cause)
    return f"{detail} at {event['endpoint'].decode(errors='replace')}"
