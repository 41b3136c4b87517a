"""``python -m gateway [--config config/llm_config.yaml] [--ports-file F]``: the HTTP gateway (OpenAI and Ollama
APIs)."""

from __future__ import annotations

import structlog
import uvicorn

from daemonkit.listening import bound_port, listen_tcp, write_ports_file
from daemonkit.startup import start_daemon
from gateway.app import build_app
from gateway.config import SHUTDOWN_GRACE_S, load_gateway_settings, load_voice_personas


def main(argv: list[str] | None = None) -> None:
    (settings, agents, ports_file), manager, _curve = start_daemon(
        "gateway",
        "The HTTP gateway: OpenAI- and Ollama-compatible APIs.",
        argv,
        lambda a: (load_gateway_settings(a.config), load_voice_personas(a.config), a.ports_file),
    )
    app = build_app(settings, manager, agents)
    sock = listen_tcp(settings.host, settings.port)  # bound here: port 0 takes any free port, reported below
    port = bound_port(sock)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        # SIGTERM: open requests get this long to finish, then the gateway ends whatever is pending.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = uvicorn.Server(config)
    structlog.get_logger("gateway").info("gateway_listening", host=settings.host, port=port)
    write_ports_file(ports_file, {"http": port})
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
