"""``python -m agents --persona NAME [--config config/llm_config.yaml]``"""

from __future__ import annotations

import sys

from agents.agent import PersonaAgent
from model_client.daemon import parser_for, wait_for_manager
from model_client.endpoints import configured_endpoints
from model_client.logs import configure_logging
from model_client.personas import load_agents_config
from model_client.security import server_from_config
from model_client.services import load_services_config


def main(argv: list[str] | None = None) -> None:
    parser = parser_for("agents", "A persona agent.")
    parser.add_argument("--persona", required=True, help="a persona of the YAML's personas section")
    args = parser.parse_args(argv)
    try:
        config = load_agents_config(args.config)
        services = load_services_config(args.config)
        manager = configured_endpoints(args.config)["requests"]
        curve = server_from_config(args.config)
        if args.persona not in config.personas:
            raise ValueError(f"unknown persona {args.persona!r}; the YAML declares {sorted(config.personas)}")
    except (OSError, ValueError, KeyError) as exc:
        print(f"agents: {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(args.log_level)
    wait_for_manager(manager, f"agents.{args.persona}")
    PersonaAgent(args.persona, config, services, manager, curve).serve()


if __name__ == "__main__":
    main()
