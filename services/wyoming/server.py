"""The Wyoming service: one asyncio loop serving the speech-to-text port, the text-to-speech port and one port per
persona, all through the manager (this process loads no model)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from wyoming.event import Event

from daemonkit.listening import bound_port, listen_tcp, write_ports_file
from model_client import protocol
from model_client.aio import ManagerLink
from services.wyoming.asr import AsrHandler
from services.wyoming.catalogue import ASR_PROGRAM, TTS_PROGRAM, Catalogue
from services.wyoming.config import WyomingConfig
from services.wyoming.connection import Handler, Peer, serve_connection
from services.wyoming.handle import HandleHandler, PersonaDoor, persona_histories
from services.wyoming.tts import TtsHandler

HEADER_LINE_LIMIT = 64 * 1024  # an event's JSON header line (its data and payload have their own limit)

log = structlog.get_logger("wyoming")


class Port:
    def __init__(
        self, key: str, name: str, port: int, describe: Callable[[], Event], handler: Callable[[Peer], Handler]
    ):
        # key: "asr", "tts" or the persona (the ports file's names); port: as configured, then as bound
        self.key, self.name, self.port, self.describe, self.handler = key, name, port, describe, handler


class WyomingService:
    def __init__(self, config: WyomingConfig, manager_endpoint: str) -> None:
        self.config = config
        self.settings = config.settings
        # Everything here is a voice turn (Home Assistant's satellites): it goes ahead of chat and batch work.
        priority = protocol.PRIORITY_INTERACTIVE
        self.link = ManagerLink(manager_endpoint, self.settings.manager_timeout_s, priority=priority)
        self.catalogue = Catalogue(self.link, config.agents.personas, self.settings.catalogue_refresh_s)
        self.connections = 0
        self.servers: list[asyncio.Server] = []
        self.ports = self._ports()

    def _ports(self) -> list[Port]:
        s, link, catalogue = self.settings, self.link, self.catalogue
        ports = []
        if s.asr_port is not None:
            asr = lambda p: AsrHandler(p, link, catalogue, s)  # noqa: E731
            ports.append(Port("asr", ASR_PROGRAM, s.asr_port, catalogue.asr_info, asr))
        if s.tts_port is not None:
            tts = lambda p: TtsHandler(p, link, catalogue, s)  # noqa: E731
            ports.append(Port("tts", TTS_PROGRAM, s.tts_port, catalogue.tts_info, tts))
        histories = persona_histories(self.config.agents)
        for persona, number in s.handle_ports.items():
            door = PersonaDoor(persona, self.config.agents, histories)
            ports.append(
                Port(
                    persona,
                    persona,
                    number,
                    lambda name=persona: catalogue.handle_info(name),
                    lambda p, door=door: HandleHandler(p, link, door),
                )
            )
        return ports

    async def serve(self, ports_file: Path | None = None) -> None:
        await self.catalogue.refresh()
        refresher = asyncio.create_task(self.catalogue.keep_fresh())
        for port in self.ports:
            server = await asyncio.start_server(
                lambda r, w, port=port: self._connection(port, r, w),
                sock=listen_tcp(self.settings.host, port.port),  # port 0: any free one, reported below
                limit=HEADER_LINE_LIMIT,
            )
            port.port = bound_port(server.sockets[0])
            self.servers.append(server)
            log.info("wyoming_listening", service=port.name, host=self.settings.host, port=port.port)
        write_ports_file(ports_file, {port.key: port.port for port in self.ports})
        zeroconf = await self._advertise() if self.settings.zeroconf else None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("wyoming_stopping")
        refresher.cancel()
        for server in self.servers:
            server.close()
        if zeroconf is not None:
            with contextlib.suppress(Exception):
                await zeroconf.async_close()
        self.link.close()

    async def _connection(self, port: Port, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(writer, port.name)
        if self.connections >= self.settings.max_connections:
            with contextlib.suppress(Exception):
                await peer.error(f"{self.connections} connections are open, the most this service takes", "busy")
            writer.close()
            return
        self.connections += 1
        try:
            await serve_connection(
                reader,
                peer,
                port.handler(peer),
                port.describe,
                self.settings.max_event_bytes,
                self.settings.idle_timeout_s,
            )
        except Exception:  # noqa: BLE001 - one peer's failure must not reach the others
            log.exception("wyoming_connection_failed", service=port.name)
        finally:
            self.connections -= 1
            writer.close()

    async def _advertise(self) -> Any:
        """mDNS records (``_wyoming._tcp``) so Home Assistant discovers each port (imported only when asked for)."""
        from zeroconf import ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        try:  # the ports are served either way: discovery failing is logged, not fatal
            host = self.settings.host
            if host in ("0.0.0.0", "", "::"):
                host = lan_address()
            zeroconf = AsyncZeroconf()
            for port in self.ports:
                info = ServiceInfo(
                    "_wyoming._tcp.local.",
                    f"{mdns_name(port.name)}._wyoming._tcp.local.",
                    addresses=[socket.inet_aton(host)],
                    port=port.port,
                )
                await zeroconf.async_register_service(info)
                log.info("zeroconf_advertised", service=port.name, address=host, port=port.port)
        except (OSError, ValueError) as exc:
            log.warning("zeroconf_failed", error=str(exc))
            return None
        return zeroconf


def mdns_name(service: str) -> str:
    return service if service.startswith("model-manager-") else f"model-manager-{service}"


def lan_address() -> str:
    """This machine's address on the network mDNS goes out on (a UDP "connection" sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("224.0.0.251", 5353))
        return probe.getsockname()[0]
