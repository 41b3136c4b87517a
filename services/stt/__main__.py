"""``python -m services.stt [--config config/llm_config.yaml]``"""

from __future__ import annotations

from services.daemon import start
from services.stt.service import SttService


def main(argv: list[str] | None = None) -> None:
    config, manager, curve = start("stt", "The speech-to-text service.", argv)
    SttService(config.stt, manager, curve).serve()


if __name__ == "__main__":
    main()
