"""The client's half of security: which addresses are local, CURVE keys for a client, and ``mm keys``.

Daemons listen only on local addresses unless CURVE is configured (``daemonkit.binding``); a client reaching one
on the network presents its key pair and the server's public key.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

CLIENT_KEY_ENV = "MM_CURVE_CLIENT_KEY"  # a client's secret key file
SERVER_KEY_ENV = "MM_CURVE_SERVER_KEY"  # the server's public key file


def is_local(endpoint: str) -> bool:
    """ipc://, inproc:// and loopback TCP are reachable from this machine only."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    return is_loopback(endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]"))


def is_loopback(host: str) -> bool:
    """A host name or address that only this machine reaches (an interface name or a wildcard is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
