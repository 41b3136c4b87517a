"""``python -m services.wyoming [--config config/llm_config.yaml]``: Home Assistant's voice over Wyoming."""

from __future__ import annotations

import asyncio

from daemonkit.startup import start_daemon
from services.wyoming.config import load_wyoming_config
from services.wyoming.server import WyomingService


def main(argv: list[str] | None = None) -> None:
    (config, ports_file), manager, _curve = start_daemon(
        "wyoming",
        "Whisper, Piper and the personas over the Wyoming protocol (Home Assistant).",
        argv,
        lambda a: (load_wyoming_config(a.config), a.ports_file),
    )
    asyncio.run(WyomingService(config, manager).serve(ports_file))


if __name__ == "__main__":
    main()
