"""Who may talk to the daemons: local sockets for the machine's own user, CURVE for anything on the network.

By default every socket is ``ipc://`` (in a 0700 directory) or loopback TCP. A daemon asked to listen on any
other address refuses to start unless CURVE is configured: its server key pair (``mm keys`` makes one) and a
directory of the client public keys it accepts. pyzmq's ZAP authenticator then lets only those clients connect;
any other peer never completes the handshake, so it gets no reply at all.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

CLIENT_KEY_ENV = "MM_CURVE_CLIENT_KEY"  # a client's secret key file
SERVER_KEY_ENV = "MM_CURVE_SERVER_KEY"  # the server's public key file


class InsecureEndpoint(ValueError):
    """A non-local address without CURVE keys."""


def is_local(endpoint: str) -> bool:
    """ipc://, inproc:// and loopback TCP are reachable from this machine only."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or a wildcard (*): not loopback


@dataclass(frozen=True)
class CurveServer:
    public: bytes
    secret: bytes
    authorized_dir: Path


@dataclass(frozen=True)
class CurveClient:
    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(cls, client_secret_file: str | Path, server_public_file: str | Path) -> CurveClient:
        public, secret = zmq.auth.load_certificate(str(client_secret_file))
        server_public, _ = zmq.auth.load_certificate(str(server_public_file))
        if secret is None:
            raise ValueError(f"{client_secret_file} holds no secret key")
        return cls(public, secret, server_public)

    @classmethod
    def from_env(cls) -> CurveClient | None:
        """Keys named by MM_CURVE_CLIENT_KEY and MM_CURVE_SERVER_KEY, when both are set."""
        client, server = os.environ.get(CLIENT_KEY_ENV), os.environ.get(SERVER_KEY_ENV)
        return cls.from_files(client, server) if client and server else None


def load_server(secret_file: str | None, authorized_dir: str | None) -> CurveServer | None:
    if not secret_file or not authorized_dir:
        return None
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    if not Path(authorized_dir).is_dir():
        raise ValueError(f"the authorized client keys directory {authorized_dir} does not exist")
    return CurveServer(public, secret, Path(authorized_dir))


def check_endpoint(endpoint: str, curve: CurveServer | None, what: str) -> None:
    if not is_local(endpoint) and curve is None:
        raise InsecureEndpoint(
            f"refusing to listen on {endpoint} ({what}) without CURVE: a non-local address needs "
            "security.curve_server_secret_key and security.curve_authorized_keys (`mm keys` makes them)"
        )


def serve_securely(sock: zmq.Socket, endpoint: str, curve: CurveServer | None) -> None:
    """Bind ``sock``; on a non-local address as a CURVE server (the ZAP authenticator must be running)."""
    if curve is not None and not is_local(endpoint):
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_server = True
    sock.bind(endpoint)


def start_authenticator(ctx: zmq.Context, curve: CurveServer) -> ThreadAuthenticator:
    """Accept CURVE clients whose public key is in ``authorized_dir`` (re-read at each start)."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(curve.authorized_dir))
    return auth


def connect_securely(sock: zmq.Socket, endpoint: str, curve: CurveClient | None) -> None:
    if curve is not None and not is_local(endpoint):
        sock.curve_secretkey = curve.secret
        sock.curve_publickey = curve.public
        sock.curve_serverkey = curve.server_public
    sock.connect(endpoint)


def make_keys(directory: Path, clients: tuple[str, ...] = ("client",)) -> dict[str, Path]:
    """A server key pair and one pair per client, the clients' public keys copied into ``authorized/``."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    authorized = directory / "authorized"
    authorized.mkdir(exist_ok=True)
    made: dict[str, Path] = {}
    public, secret = zmq.auth.create_certificates(str(directory), "server")
    made["server_public"], made["server_secret"] = Path(public), Path(secret)
    for name in clients:
        public, secret = zmq.auth.create_certificates(str(directory), name)
        (authorized / Path(public).name).write_bytes(Path(public).read_bytes())
        made[f"{name}_public"], made[f"{name}_secret"] = Path(public), Path(secret)
    for path in made.values():
        if path.name.endswith("_secret"):
            os.chmod(path, 0o600)
    made["authorized"] = authorized
    return made


def server_from_config(path: Path) -> CurveServer | None:
    """The ``security`` section of the YAML (relative paths against its directory), for any daemon."""
    from model_client.endpoints import config_section

    section, base = config_section("security", path)
    secret, authorized = section.get("curve_server_secret_key"), section.get("curve_authorized_keys")
    return load_server(
        str((base / secret).resolve()) if secret else None,
        str((base / authorized).resolve()) if authorized else None,
    )


class Binder:
    """Binds a daemon's sockets under the rule above, running the ZAP authenticator when CURVE is configured."""

    def __init__(self, ctx: zmq.Context, curve: CurveServer | None) -> None:
        self.curve = curve
        self.auth = start_authenticator(ctx, curve) if curve is not None else None

    def bind(self, sock: zmq.Socket, endpoint: str, what: str) -> None:
        check_endpoint(endpoint, self.curve, what)
        serve_securely(sock, endpoint, self.curve)

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
