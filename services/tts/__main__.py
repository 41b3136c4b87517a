"""``python -m services.tts [--config config/llm_config.yaml]``"""

from __future__ import annotations

from services.daemon import start
from services.tts.service import TtsService


def main(argv: list[str] | None = None) -> None:
    config, manager, curve = start("tts", "The text-to-speech service.", argv)
    TtsService(config.tts, manager, curve).serve()


if __name__ == "__main__":
    main()
