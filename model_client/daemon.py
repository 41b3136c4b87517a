"""Helpers for daemons built on the client (the services, the persona agents): command line and start-up."""

from __future__ import annotations

import argparse
from pathlib import Path

import structlog

from model_client.client import ModelClient
from model_client.endpoints import config_path


def parser_for(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, default=config_path(), help="YAML config (default: %(default)s)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    return parser


def wait_for_manager(endpoint: str, who: str) -> None:
    """Started beside the manager (supervisord starts everything at once): wait for its ``ping``, don't fail."""
    log = structlog.get_logger(who)
    announced = [0.0]

    def waiting(seconds: float) -> None:
        if seconds - announced[0] >= 5.0:
            announced[0] = seconds
            log.info("waiting_for_manager", endpoint=endpoint, waited_s=round(seconds, 1))

    with ModelClient(endpoint, retries=0) as client:
        reply = client.wait_ready(on_wait=waiting)
    log.info("manager_ready", endpoint=endpoint, manager_pid=reply.get("pid"))
