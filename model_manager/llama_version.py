"""Which llama-cpp-python release the engine needs, checked without importing it (the manager never loads it).

The engine uses llama-cpp-python's private modules (``backends/llama_cpp_api.py``), which change between releases,
so it is written and measured against one release, pinned in pyproject.toml. The manager checks it at start-up and
a worker before loading a model: another version is a clear refusal naming the one needed, not a crash deep in a
ctypes call.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

TESTED = "0.3.36"  # the llama-cpp-python release the engine is written and measured against


class WrongLlamaCpp(RuntimeError):
    """The installed llama-cpp-python is not the release the engine needs."""


def installed_version() -> str | None:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def check_version(installed: str | None = None) -> None:
    """Raises ``WrongLlamaCpp`` naming the needed release unless ``installed`` (default: what pip installed) is it."""
    found = installed if installed is not None else installed_version()
    if found != TESTED:
        what = f"llama-cpp-python {found} is installed" if found else "llama-cpp-python is not installed"
        raise WrongLlamaCpp(
            f"{what}; the engine needs {TESTED} (it uses that release's private API): "
            f"pip install 'llama-cpp-python=={TESTED}'"
        )
