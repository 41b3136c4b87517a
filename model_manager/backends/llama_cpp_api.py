"""The one place that reaches into llama-cpp-python's private modules (``_internals``, ``_utils``, ``_logger``).

They are not its public API and change between releases: the engine is written against the release
``model_manager.llama_version.TESTED`` names (pinned in pyproject.toml), which the manager checks at start-up and a
worker before each load. Everything else imports these names from here.
"""

from __future__ import annotations

from llama_cpp._internals import LlamaContext, LlamaModel, LlamaSampler
from llama_cpp._logger import set_verbose
from llama_cpp._utils import suppress_stdout_stderr

__all__ = ["LlamaContext", "LlamaModel", "LlamaSampler", "set_verbose", "suppress_stdout_stderr"]
