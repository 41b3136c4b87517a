"""What every daemon's part of the YAML is made of: one strict section base, one reader, errors naming the key.

The manager, the services and the persona agents share one YAML file; each reads and checks only its own sections,
so a typo in any of them (an unknown key, a wrong type) ends that daemon at start with one line that says where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import msgspec

from model_client.endpoints import parse_yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """The YAML is not what the daemon can run on; the message names the file and the key."""


class Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A part of the YAML: unknown keys are errors, not silently ignored."""


def read_sections(path: Path) -> tuple[dict[str, Any], Path]:
    """The whole YAML as a mapping, and its directory (relative paths in it are relative to that)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    return sections_from_text(text, str(path)), path.resolve().parent


def sections_from_text(text: str, source: str) -> dict[str, Any]:
    try:
        return parse_yaml(text)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def convert(value: object, type_: type[T], source: str, at: str) -> T:
    """msgspec.convert whose error names the whole key path (msgspec writes ``[...]`` for mapping keys)."""
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        message = str(exc)
        message = message.replace("`$", f"`{at}") if "`$" in message else f"{message} - at `{at}`"
        raise ConfigError(f"{source}: {message}") from None


def resolve_path(value: str, base_dir: Path) -> Path:
    """``value`` made absolute against the YAML's directory (``~`` expanded)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()
