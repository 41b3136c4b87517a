"""``python -m services.tts [--config config/llm_config.yaml]``"""

from __future__ import annotations

from daemonkit.startup import start_daemon
from personas.speech_services import load_services_config
from services.tts.service import TtsService


def main(argv: list[str] | None = None) -> None:
    config, manager, curve = start_daemon(
        "services.tts", "The text-to-speech service.", argv, lambda args: load_services_config(args.config)
    )
    TtsService(config.tts, manager, curve).serve()


if __name__ == "__main__":
    main()
