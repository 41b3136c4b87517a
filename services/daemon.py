"""What every service's ``__main__`` does: read the YAML, set up logs, wait for the manager."""

from __future__ import annotations

import sys

from model_client.daemon import parser_for, wait_for_manager
from model_client.endpoints import configured_endpoints
from model_client.logs import configure_logging
from model_client.security import CurveServer, server_from_config
from model_client.services import ServicesConfig, load_services_config


def start(name: str, description: str, argv: list[str] | None = None) -> tuple[ServicesConfig, str, CurveServer | None]:
    """Parse the command line, wait for the manager; return the services' settings and the manager's endpoint."""
    args = parser_for(f"services.{name}", description).parse_args(argv)
    try:
        config = load_services_config(args.config)
        manager = configured_endpoints(args.config)["requests"]
        curve = server_from_config(args.config)
    except (OSError, ValueError, KeyError) as exc:
        print(f"services.{name}: {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(args.log_level)
    wait_for_manager(manager, f"services.{name}")
    return config, manager, curve
