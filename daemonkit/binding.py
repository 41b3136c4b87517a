"""Who may talk to the daemons: local sockets for the machine's own user, CURVE for anything on the network.

By default every socket is ``ipc://`` (in a 0700 directory) or loopback TCP. A daemon asked to listen on any
other address refuses to start unless CURVE is configured: its server key pair (``mm keys`` makes one) and a
directory of the client public keys it accepts. pyzmq's ZAP authenticator then lets only those clients connect;
any other peer never completes the handshake, so it gets no reply at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from daemonkit.settings import Section, convert, read_sections, resolve_path
from model_client.endpoints import ipc_path
from model_client.security import is_local


class InsecureEndpoint(ValueError):
    """A non-local address without CURVE keys."""


@dataclass(frozen=True)
class CurveServer:
    public: bytes
    secret: bytes
    authorized_dir: Path


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


def prepare_ipc_dir(endpoint: str) -> None:
    """ipc sockets live in a directory only this user can enter (mode 0700)."""
    path = ipc_path(endpoint)
    if path is not None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def remove_ipc_file(endpoint: str) -> None:
    path = ipc_path(endpoint)
    if path is not None:
        path.unlink(missing_ok=True)


class Security(Section):
    """CURVE for endpoints that are not local (``mm keys`` makes the files); without it a daemon refuses them."""

    curve_server_secret_key: str | None = None  # the server's .key_secret file
    curve_authorized_keys: str | None = None  # a directory of the client public keys allowed in

    def resolved(self, base_dir: Path) -> Security:
        """Relative paths made absolute against the YAML's directory."""
        secret, authorized = self.curve_server_secret_key, self.curve_authorized_keys
        return Security(
            curve_server_secret_key=str(resolve_path(secret, base_dir)) if secret else None,
            curve_authorized_keys=str(resolve_path(authorized, base_dir)) if authorized else None,
        )


def server_from_config(path: Path) -> CurveServer | None:
    """The ``security`` section of the YAML, for any daemon."""
    sections, base = read_sections(path)
    security = convert(sections.get("security") or {}, Security, str(path), "$.security").resolved(base)
    return load_server(security.curve_server_secret_key, security.curve_authorized_keys)


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
