"""``python -m services.stt [--config config/llm_config.yaml]``"""

from __future__ import annotations

from daemonkit.startup import start_daemon
from personas.speech_services import load_services_config
from services.stt.service import SttService


def main(argv: list[str] | None = None) -> None:
    config, manager, curve = start_daemon(
        "services.stt", "The speech-to-text service.", argv, lambda args: load_services_config(args.config)
    )
    SttService(config.stt, manager, curve).serve()


if __name__ == "__main__":
    main()
