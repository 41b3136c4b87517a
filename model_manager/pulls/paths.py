"""File names from a hub's listing, taken as paths inside a model's folder only once they cannot lead out of it.

A listing is the hub's word, and a hub may be hostile or mistaken: ``../../x``, ``sub/../../../x``, ``/etc/x``,
``..\\x`` or ``C:x`` used as a path would write outside ``catalogue.models_dir``. A name is refused unless it is a
plain relative POSIX path: no absolute path, no ``.`` or ``..`` or empty component, no backslash, no drive letter,
no NUL or control character, no component longer than a file name may be. Then its place, resolved (a link already
in the folder followed), must still be inside the resolved folder. Every name of a pull is checked before any
byte is written, so a refused pull writes nothing at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from model_client.errors import PullFailed

MAX_NAME = 1024
MAX_COMPONENT = 255  # bytes: a file name's limit on the usual file systems
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unsafe_because(name: str) -> str | None:
    """Why ``name`` is not a plain relative path, or None when it is one."""
    if not name:
        return "an empty name"
    if len(name) > MAX_NAME:
        return f"a name over {MAX_NAME} characters"
    if _CONTROL.search(name):
        return "a NUL or control character"
    if "\\" in name:
        return "a backslash"
    if name.startswith("/"):
        return "an absolute path"
    for part in name.split("/"):
        if part == "":
            return "an empty component"
        if part in (".", ".."):
            return f"a {part!r} component"
        if _DRIVE.match(part):
            return "a drive letter"
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT:
            return f"a component over {MAX_COMPONENT} bytes"
    return None


def _refused(name: str, why: str) -> PullFailed:
    return PullFailed(
        f"the source lists a file {name!r} whose name is not a path inside the model's folder ({why}): "
        "the pull is refused and nothing was written",
        reason="unsafe_path",
        file=name,
    )


def check_names(names: Iterable[str]) -> None:
    """``unsafe_path`` naming the first name that is not a plain relative path."""
    for name in names:
        if why := unsafe_because(name):
            raise _refused(name, why)


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, once ``name`` is a plain relative path whose resolved place is inside ``folder``."""
    check_names([name])
    root = folder.resolve()
    if not (folder / name).resolve().is_relative_to(root):
        raise _refused(name, f"it leads out of {folder} through a link")
    return folder / name
