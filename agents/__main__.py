"""``python -m agents --persona NAME [--config config/llm_config.yaml]``"""

from __future__ import annotations

import argparse

from agents.persona import PersonaAgent
from daemonkit.startup import start_daemon
from personas.config import AgentsConfig, load_agents_config
from personas.speech_services import ServicesConfig, load_services_config


def _load(args: argparse.Namespace) -> tuple[str, AgentsConfig, ServicesConfig]:
    config = load_agents_config(args.config)
    if args.persona not in config.personas:
        raise ValueError(f"unknown persona {args.persona!r}; the YAML declares {sorted(config.personas)}")
    return args.persona, config, load_services_config(args.config)


def main(argv: list[str] | None = None) -> None:
    def add_persona(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--persona", required=True, help="a persona of the YAML's personas section")

    (persona, config, services), manager, curve = start_daemon("agents", "A persona agent.", argv, _load, add_persona)
    PersonaAgent(persona, config, services, manager, curve).serve()


if __name__ == "__main__":
    main()
