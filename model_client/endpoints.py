"""Where the manager listens: from an argument, else ``MM_ENDPOINT``, else the config's ``endpoints`` section.

Relative ``ipc://`` paths in the YAML are relative to the YAML file's directory, so a checkout can be moved.
This module reads only the ``endpoints`` section, so clients need not know the manager's config schema.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "config" / "llm_config.yaml"


def config_path() -> Path:
    return Path(os.environ.get("MM_CONFIG", DEFAULT_CONFIG))


def resolve_endpoint(endpoint: str, base_dir: Path) -> str:
    """Make a relative ``ipc://`` path absolute against ``base_dir``; other transports pass unchanged."""
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://") :])
        if not path.is_absolute():
            return f"ipc://{(base_dir / path).resolve()}"
    return endpoint


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None


def read_yaml(path: Path) -> dict:
    """The config file as a mapping: the one place it is read. Raises OSError, or ValueError (``parse_yaml``)."""
    return parse_yaml(Path(path).read_text(encoding="utf-8"))


def parse_yaml(text: str) -> dict:
    """YAML text as a mapping; ValueError if it is not YAML or not a mapping of keys."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("the top level must be a mapping of keys")
    return data


def configured_endpoints(path: Path | None = None) -> dict[str, str]:
    path = path or config_path()
    section = read_yaml(path).get("endpoints") or {}
    return {name: resolve_endpoint(str(value), path.parent) for name, value in section.items()}


def default_endpoint(kind: str = "requests") -> str:
    """The endpoint a client uses when none is given: ``MM_ENDPOINT`` (requests only), else the config."""
    if kind == "requests" and os.environ.get("MM_ENDPOINT"):
        return os.environ["MM_ENDPOINT"]
    return configured_endpoints()[kind]
