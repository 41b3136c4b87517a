"""``python -m gateway [--config config/llm_config.yaml]``: the HTTP gateway (OpenAI and Ollama APIs)."""

from __future__ import annotations

import structlog
import uvicorn

from daemonkit.startup import start_daemon
from gateway.app import build_app
from gateway.config import load_gateway_settings


def main(argv: list[str] | None = None) -> None:
    settings, manager, _curve = start_daemon(
        "gateway",
        "The HTTP gateway: OpenAI- and Ollama-compatible APIs.",
        argv,
        lambda a: load_gateway_settings(a.config),
    )
    app = build_app(settings, manager)
    structlog.get_logger("gateway").info("gateway_listening", host=settings.host, port=settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
