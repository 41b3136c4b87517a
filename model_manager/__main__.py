"""``python -m model_manager --config config/llm_config.yaml``: load the config, set up logs, serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daemonkit.binding import InsecureEndpoint
from daemonkit.listening import write_ports_file
from daemonkit.logs import configure_logging
from daemonkit.memory import return_freed_memory
from model_client.endpoints import config_path
from model_manager.broker import ModelManagerAgent
from model_manager.config import ConfigError, load_config
from model_manager.llama_version import WrongLlamaCpp, check_version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="model_manager", description="The ModelManagerAgent daemon.")
    parser.add_argument("--config", default=str(config_path()), help="YAML config (default: %(default)s)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides the config")
    parser.add_argument(
        "--ports-file", type=Path, help="write the TCP ports the request and event sockets got (tcp://HOST:* binds any)"
    )
    args = parser.parse_args(argv)
    return_freed_memory()  # before any thread (ZeroMQ's I/O) allocates
    try:
        check_version()
    except WrongLlamaCpp as exc:
        print(f"model_manager: {exc}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"model_manager: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level or config.manager.log_level)
    try:
        agent = ModelManagerAgent(config, args.config)
    except (InsecureEndpoint, ValueError, OSError) as exc:
        print(f"model_manager: {exc}", file=sys.stderr)
        return 2
    write_ports_file(args.ports_file, agent.tcp_ports())
    agent.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
