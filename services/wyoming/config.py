"""The ``wyoming`` section of the YAML: where the Wyoming service listens, and its limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec

from daemonkit.settings import ConfigError, Section, convert, read_sections
from model_client.security import is_loopback
from personas.config import AgentsConfig, load_agents_config

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]  # 0: any free port (the daemon's --ports-file tells which)


class WyomingSettings(Section):
    # Wyoming has no authentication: anyone who reaches a port uses the models. Off loopback only with
    # allow_remote (then keep the ports to your own network).
    host: str = "127.0.0.1"
    allow_remote: bool = False
    asr_port: Port | None = 10300  # speech to text (the port wyoming-faster-whisper uses); null: not served
    tts_port: Port | None = 10200  # text to speech (wyoming-piper's port); null: not served
    handle_ports: dict[str, Port] = {}  # persona -> port: each persona a conversation agent of its own
    zeroconf: bool = False  # advertise the ports by mDNS so Home Assistant discovers them (a host off loopback)
    language: str | None = None  # the language asked of Whisper when the peer names none; None: detect
    vad_filter: bool = True  # the manager's VAD trims silence before Whisper
    catalogue_refresh_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0  # `describe` answers from a cached copy
    manager_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0  # a connection silent this long is closed
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 64  # all ports together; more are refused with `busy`
    max_event_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 1024 * 1024  # header line, data or payload
    max_audio_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0  # longest utterance a transcription takes...
    max_audio_bytes: Annotated[int, msgspec.Meta(ge=65536)] = 8 * 1024 * 1024  # ...and its most PCM, whatever format
    max_text_chars: Annotated[int, msgspec.Meta(ge=1)] = 10000  # longest text a synthesis takes
    samples_per_chunk: Annotated[int, msgspec.Meta(ge=64)] = 1024  # audio-chunk size sent to the peer


@dataclass(frozen=True)
class WyomingConfig:
    settings: WyomingSettings
    agents: AgentsConfig


def load_wyoming_config(path: Path) -> WyomingConfig:
    data, _base = read_sections(path)
    settings = convert(data.get("wyoming") or {}, WyomingSettings, str(path), "$.wyoming")
    agents = load_agents_config(path)
    for persona in settings.handle_ports:
        if persona not in agents.personas:
            raise ConfigError(
                f"{path}: wyoming.handle_ports names {persona!r}, which is not a persona "
                f"({sorted(agents.personas)}) - at `$.wyoming.handle_ports`"
            )
    ports = [p for p in (settings.asr_port, settings.tts_port, *settings.handle_ports.values()) if p]
    if len(ports) != len(set(ports)):
        raise ConfigError(f"{path}: two Wyoming services share a port ({ports}) - at `$.wyoming`")
    if not is_loopback(settings.host) and not settings.allow_remote:
        raise ConfigError(
            f"{path}: wyoming.host {settings.host!r} is off loopback, and Wyoming has no authentication: set "
            "wyoming.allow_remote: true to serve your network anyway - at `$.wyoming`"
        )
    if settings.zeroconf and is_loopback(settings.host):
        raise ConfigError(
            f"{path}: wyoming.zeroconf announces the ports to the network, but wyoming.host {settings.host!r} is "
            "loopback: set host (e.g. 0.0.0.0) and allow_remote, or zeroconf: false - at `$.wyoming`"
        )
    return WyomingConfig(settings=settings, agents=agents)
