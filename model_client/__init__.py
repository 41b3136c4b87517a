"""Client library for the ModelManagerAgent: ``from model_client import ModelClient``."""

from model_client.client import Completion, Conversation, ModelClient, Stream
from model_client.errors import (
    BadRequest,
    Busy,
    ContextOverflow,
    InsufficientMemory,
    InternalError,
    ModelFailed,
    ModelLoadFailed,
    ModelManagerError,
    ModelNotFound,
    Timeout,
    UnknownOp,
    UnsupportedVersion,
)

__all__ = [
    "BadRequest",
    "Busy",
    "Completion",
    "ContextOverflow",
    "Conversation",
    "InsufficientMemory",
    "InternalError",
    "ModelClient",
    "ModelFailed",
    "ModelLoadFailed",
    "ModelManagerError",
    "ModelNotFound",
    "Stream",
    "Timeout",
    "UnknownOp",
    "UnsupportedVersion",
]
