"""The ``gateway`` section of the YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from daemonkit.settings import ConfigError, Section, convert, read_sections, resolve_path
from gateway.trust import HOST_PATTERN, ORIGIN_PATTERN
from model_client.protocol import DEFAULT_MAX_MESSAGE_BYTES
from model_client.security import is_loopback
from personas.config import AgentsConfig, AgentSettings, Routing, load_agents_config

SHUTDOWN_GRACE_S = 3.0  # SIGTERM: what open requests get before the gateway ends them
DEFAULT_HEARTBEAT_S = 5.0  # the manager's, when its YAML section does not say


class GatewaySettings(Section):
    host: str = "127.0.0.1"  # off loopback, `api_keys` must be set: clients then send `Authorization: Bearer KEY`
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8100  # 0: any free port (see --ports-file)
    api_keys: list[Annotated[str, msgspec.Meta(min_length=16)]] = []
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0  # how long a request may wait for the manager
    # At most the manager's limits.max_message_bytes, whatever is set here: a larger body could never reach it.
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = DEFAULT_MAX_MESSAGE_BYTES
    # The Responses API's stored responses (what previous_response_id continues), one file each, kept across
    # restarts; relative to the YAML. null: in memory only.
    responses_dir: str | None = None
    max_stored_responses: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    # Who may talk to it (see gateway/trust.py): host names beyond loopback, the bind address and this machine's
    # name ("*.example.com" for a domain's; "*": any, behind a proxy that checks names itself), and the web pages
    # beyond the gateway's own that may call it ("http://localhost:3000", "https://app.example.com",
    # "http://localhost:*" for any port; "*": any page, which gives every web page you visit the gateway).
    allowed_hosts: list[Annotated[str, msgspec.Meta(pattern=HOST_PATTERN, max_length=253)]] = []
    allowed_origins: list[Annotated[str, msgspec.Meta(pattern=ORIGIN_PATTERN, max_length=300)]] = []
    # The page's sign-in (with api_keys): how long a session lasts; wrong keys a client address may send in a
    # window before it is refused (429) until the window has passed.
    ui_session_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 12 * 3600.0
    auth_max_failures: Annotated[int, msgspec.Meta(ge=1)] = 5
    auth_window_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # How often the manager publishes its heartbeat; null: the YAML's manager.heartbeat_s (set it when the gateway
    # reads another YAML than the manager's). The page says "manager unreachable" after two without one.
    manager_heartbeat_s: Annotated[float, msgspec.Meta(gt=0)] | None = None


def no_personas() -> AgentsConfig:
    """For a YAML without personas: the Realtime API then serves chat models only."""
    return AgentsConfig(agents=AgentSettings(history_dir=None), personas={}, routing=Routing(default=""))


def load_voice_personas(path: Path) -> AgentsConfig:
    """The personas a Realtime session may talk to (the YAML's agents, personas and routing), if it has any."""
    data, _base_dir = read_sections(path)
    return load_agents_config(path) if data.get("personas") else no_personas()


def load_gateway_settings(path: Path) -> GatewaySettings:
    data, base_dir = read_sections(path)
    settings = convert(data.get("gateway") or {}, GatewaySettings, str(path), "$.gateway")
    if settings.responses_dir is not None:
        directory = str(resolve_path(settings.responses_dir, base_dir))
        settings = msgspec.structs.replace(settings, responses_dir=directory)
    if settings.manager_heartbeat_s is None:
        beat = (data.get("manager") or {}).get("heartbeat_s", DEFAULT_HEARTBEAT_S)
        beat = beat if isinstance(beat, (int, float)) and beat > 0 else DEFAULT_HEARTBEAT_S
        settings = msgspec.structs.replace(settings, manager_heartbeat_s=float(beat))
    manager_limit = (data.get("limits") or {}).get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
    if isinstance(manager_limit, int) and manager_limit < settings.max_body_bytes:
        settings = msgspec.structs.replace(settings, max_body_bytes=manager_limit)
    if not is_loopback(settings.host) and not settings.api_keys:
        raise ConfigError(
            f"{path}: gateway.host {settings.host!r} is off loopback: set gateway.api_keys - at `$.gateway`"
        )
    return settings
