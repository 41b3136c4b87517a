"""Who may talk to the gateway: the ``Host`` and ``Origin`` rules that keep web pages from driving it.

A page on any other origin can make a browser send requests here without asking (a form POST, ``fetch`` with
``mode: 'no-cors'``, a ``text/plain`` body: no CORS preflight), and DNS rebinding can point a name the page owns
at 127.0.0.1, which makes the gateway look same-origin to it. API keys do not help a gateway without keys, the
default on loopback. Two checks close both, as Ollama's ``OLLAMA_HOST``/``OLLAMA_ORIGINS`` remedy did:

- the ``Host`` a request names must be one of the gateway's own: loopback names, the bind address, the machine's
  host name, an IP address (DNS rebinding needs a name it controls), or ``gateway.allowed_hosts``;
- an ``Origin``, when sent, must be the gateway's own (its host and port are the request's ``Host``) or one of
  ``gateway.allowed_origins``. A browser sends ``Origin`` on every cross-origin request that could change
  anything; clients that are not browsers (curl, the ``openai`` and ``ollama`` packages) send none, and are not
  concerned. ``Sec-Fetch-Site`` marks the few cross-origin reads a browser makes without ``Origin``.

Pure functions of the settings and the headers, so every rule is tested without a server.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from gateway.errors import HttpError

HOST_SETTING = "gateway.allowed_hosts"
ORIGIN_SETTING = "gateway.allowed_origins"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = rf"{_LABEL}(?:\.{_LABEL})*"
_IPV6 = r"\[[0-9A-Fa-f:.]+\]"
# What the settings may hold (checked when the YAML is read, so a typo or a hostile value stops the gateway).
HOST_PATTERN = rf"^(?:\*|(?:\*\.)?{_NAME}|{_IPV6})\Z"
ORIGIN_PATTERN = rf"^(?:\*|[A-Za-z][A-Za-z0-9+.-]*://(?:(?:\*\.)?{_NAME}|{_IPV6})(?::(?:[0-9]{{1,5}}|\*))?)\Z"

_HOST_HEADER = re.compile(rf"^({_NAME}\.?|{_IPV6})(?::([0-9]{{1,5}}))?\Z")
_ORIGIN_HEADER = re.compile(rf"^([a-z][a-z0-9+.-]*)://({_NAME}|{_IPV6})(?::([0-9]{{1,5}}|\*))?\Z")


@dataclass(frozen=True)
class Trust:
    names: frozenset[str]  # host names (lower case, no port) a request may name
    suffixes: tuple[str, ...]  # ".example.com" for a "*.example.com" entry
    any_host: bool
    origins: tuple[tuple[str, str, str | None], ...]  # (scheme, host or ".suffix", port, "*" or None for default)
    any_origin: bool


def own_names(bind_host: str) -> set[str]:
    """The names this machine answers to without anyone's say-so: loopback, the bind address, its host name."""
    names = {*LOOPBACK_NAMES, bind_host.lower().strip("[]")}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower().rstrip("."))
    return names


def build_trust(bind_host: str, allowed_hosts: list[str], allowed_origins: list[str]) -> Trust:
    names = own_names(bind_host)
    suffixes: list[str] = []
    for entry in allowed_hosts:
        entry = entry.lower()
        if entry.startswith("*."):
            suffixes.append(entry[1:])
        elif entry != "*":
            names.add(entry.strip("[]"))
    origins = []
    for entry in allowed_origins:
        if entry == "*":
            continue
        parsed = parse_origin(entry.lower())
        if parsed is None:
            raise ValueError(f"{entry!r} is not an origin (scheme://host[:port])")
        scheme, host, port = parsed
        origins.append((scheme, host[1:] if host.startswith("*.") else host, port))
    return Trust(
        names=frozenset(names),
        suffixes=tuple(suffixes),
        any_host="*" in allowed_hosts,
        origins=tuple(origins),
        any_origin="*" in allowed_origins,
    )


def parse_host(value: str) -> tuple[str, str | None] | None:
    """A ``Host`` header as (host in lower case without brackets or a final dot, port), or None if malformed."""
    match = _HOST_HEADER.match(value)
    if match is None:
        return None
    host = match.group(1).lower().rstrip(".")
    return host.strip("[]"), match.group(2)


def parse_origin(value: str) -> tuple[str, str, str | None] | None:
    """An origin as (scheme, host in lower case without brackets, port as written or None), or None."""
    match = _ORIGIN_HEADER.match(value.lower())
    if match is None:
        # A "*.example.com" host, in a setting.
        wild = re.match(rf"^([a-z][a-z0-9+.-]*)://\*\.({_NAME})(?::([0-9]{{1,5}}|\*))?\Z", value.lower())
        if wild is None:
            return None
        return wild.group(1), "*." + wild.group(2), wild.group(3)
    return match.group(1), match.group(2).strip("[]"), match.group(3)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_allowed(trust: Trust, host: str) -> bool:
    """A name DNS rebinding cannot use: one of the gateway's own, an address, ``*.localhost``, or a setting's."""
    return (
        trust.any_host
        or host in trust.names
        or _is_address(host)
        or host.endswith(".localhost")
        or any(host.endswith(suffix) for suffix in trust.suffixes)
    )


def _port(scheme: str, port: str | None) -> int | None:
    return int(port) if port is not None else DEFAULT_PORTS.get(scheme)


def same_origin(origin: tuple[str, str, str | None], host: tuple[str, str | None]) -> bool:
    """The page is served by this gateway: its host and port are the request's ``Host`` (a ``Host`` without a
    port came through a proxy on a default port, 80 or 443)."""
    scheme, origin_host, origin_port = origin
    if scheme not in ("http", "https") or origin_host != host[0]:
        return False
    port = _port(scheme, origin_port)
    return port in (80, 443) if host[1] is None else port == int(host[1])


def origin_listed(trust: Trust, origin: tuple[str, str, str | None]) -> bool:
    scheme, host, port = origin
    for allowed_scheme, allowed_host, allowed_port in trust.origins:
        if scheme != allowed_scheme:
            continue
        if allowed_host.startswith(".") and not host.endswith(allowed_host):
            continue
        if not allowed_host.startswith(".") and host != allowed_host:
            continue
        if allowed_port == "*" or _port(scheme, port) == _port(allowed_scheme, allowed_port):
            return True
    return False


def refusal(trust: Trust, method: str, headers: dict[bytes, bytes]) -> HttpError | None:
    """None if a request with these headers may be served; else why not (a 403 naming the setting that would
    allow it)."""
    raw_host = headers.get(b"host", b"").decode("latin-1")
    host = parse_host(raw_host) if raw_host else ("", None)
    if host is None or (raw_host and not host_allowed(trust, host[0])):
        return HttpError(
            403,
            f"the host name {raw_host[:100]!r} is not one of this gateway's (DNS rebinding?): "
            f"add it to {HOST_SETTING} to serve it",
            code="host_not_allowed",
        )
    if trust.any_origin:
        return None
    raw_origin = headers.get(b"origin")
    if raw_origin is None:
        site = headers.get(b"sec-fetch-site", b"").lower()
        navigating = headers.get(b"sec-fetch-mode", b"").lower() == b"navigate" and method in ("GET", "HEAD")
        if site in (b"cross-site", b"same-site") and not navigating:
            return HttpError(
                403,
                f"a request from another web page is refused: add that page's origin to {ORIGIN_SETTING} to allow it",
                code="origin_not_allowed",
            )
        return None
    text = raw_origin.decode("latin-1")
    origin = parse_origin(text)
    if origin is not None and "*" not in (origin[2] or "") and not origin[1].startswith("*"):
        if (raw_host and same_origin(origin, host)) or origin_listed(trust, origin):
            return None
    return HttpError(
        403,
        f"requests from the web page at {text[:100]!r} are refused: add that origin to {ORIGIN_SETTING} to allow it",
        code="origin_not_allowed",
    )
