"""The part of the catalogue that changes while the manager runs: one YAML fragment per model in ``catalogue.dir``.

A pull writes a fragment once its files are verified; a person may write or edit one by hand; ``copy`` writes an
alias fragment (a second name for the same model, so the same weights never load twice). Each fragment is checked
as strictly as the main YAML (unknown keys, types, paths); a broken one is reported by file and left out, and the
others still count. The main YAML's models are not here and cannot be removed at run time.

A model fragment::

    name: hf.co/ORG/REPO:Q4_K_M            # the catalogue name
    model: {kind: llm, path: ..., quantization: Q4_K_M}   # a `models:` entry; paths relative to this folder
    source: {ref: ..., revision: ..., files: [{name, size, sha256}]}   # where it came from (not read back)

An alias fragment::

    name: my-assistant
    alias_of: hf.co/ORG/REPO:Q4_K_M
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml

from daemonkit.settings import ConfigError, Section, convert, sections_from_text
from model_manager.config import Defaults, ModelName, ModelSpec, resolve_model

SUFFIX = ".yaml"


class Fragment(Section):
    name: ModelName
    model: dict[str, Any] | None = None
    alias_of: ModelName | None = None
    source: dict[str, Any] = {}


@dataclass
class Catalogue:
    """What the fragments say: models, aliases (alias -> model), the file of each name, and the broken files."""

    models: dict[str, ModelSpec] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


def fragment_path(folder: str | Path, name: str) -> Path:
    return Path(folder) / (re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "--")) + SUFFIX)


def signature(folder: str | Path) -> tuple:
    """What changes when a fragment is added, removed or edited (names, sizes, modification times)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return ()
    return tuple((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries if e.name.endswith(SUFFIX))


def read_catalogue(folder: str | Path, defaults: Defaults, reserved: set[str]) -> Catalogue:
    """Every fragment in ``folder``; ``reserved``: the main YAML's model names, which no fragment may take."""
    found = Catalogue()
    folder = Path(folder)
    paths = sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
    pending_aliases: dict[str, tuple[str, Path]] = {}
    for path in paths:
        try:
            data = sections_from_text(path.read_text(encoding="utf-8"), str(path))
            fragment = convert(data, Fragment, str(path), "$")
            if (fragment.model is None) == (fragment.alias_of is None):
                raise ConfigError(f"{path}: a fragment has `model` or `alias_of`, one of them - at `$`")
            if fragment.name in reserved or fragment.name in found.files:
                raise ConfigError(f"{path}: the name {fragment.name!r} is taken already - at `$.name`")
            if fragment.model is not None:
                spec = convert(fragment.model, ModelSpec, str(path), "$.model")
                found.models[fragment.name] = resolve_model(spec, defaults, folder, str(path), "$.model")
                found.sources[fragment.name] = fragment.source
            else:
                pending_aliases[fragment.name] = (str(fragment.alias_of), path)
            found.files[fragment.name] = path
        except (ConfigError, OSError, UnicodeDecodeError) as exc:
            found.problems[path.name] = str(exc)
    for alias, (target, path) in pending_aliases.items():
        if target in found.models or target in reserved:
            found.aliases[alias] = target
        else:
            found.problems[path.name] = f"{path}: `alias_of` names {target!r}, which is not a model - at `$.alias_of`"
            del found.files[alias]
    return found


def write_fragment(folder: str | Path, name: str, body: dict[str, Any], comment: str = "") -> Path:
    """Write a fragment atomically (a reader never sees half of one); model paths made relative to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    body = {"name": name, **body}
    if isinstance(body.get("model"), dict) and body["model"].get("path"):
        body["model"] = {**body["model"], "path": os.path.relpath(body["model"]["path"], folder)}
    text = (f"# {comment}\n" if comment else "") + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fragment-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    path = fragment_path(folder, name)
    os.replace(tmp, path)
    return path


def model_body(spec: ModelSpec) -> dict[str, Any]:
    """A spec as a fragment's ``model`` map (only what differs from a fresh entry)."""
    return {k: v for k, v in msgspec.to_builtins(spec).items() if v not in (None, [], "")}
