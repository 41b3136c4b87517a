"""What every service's ``__main__`` does: read the YAML, set up logs, find the manager."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_client.endpoints import config_path, configured_endpoints
from model_client.logs import configure_logging
from model_client.services import ServicesConfig, load_services_config


def start(name: str, description: str, argv: list[str] | None = None) -> tuple[ServicesConfig, str]:
    """Parse the command line; return the services' settings and the manager's request endpoint."""
    parser = argparse.ArgumentParser(prog=f"services.{name}", description=description)
    parser.add_argument("--config", type=Path, default=config_path(), help="YAML config (default: %(default)s)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    args = parser.parse_args(argv)
    try:
        config = load_services_config(args.config)
        manager = configured_endpoints(args.config)["requests"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"services.{name}: {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(args.log_level)
    return config, manager
