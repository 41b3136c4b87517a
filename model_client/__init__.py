"""Client library for the ModelManagerAgent: ``from model_client import ModelClient``."""

from model_client.audio import Audio
from model_client.client import Completion, Conversation, ModelClient, Speech, SpeechStream, Stream, Transcript
from model_client.errors import (
    BadRequest,
    Busy,
    ContextOverflow,
    InsufficientMemory,
    InternalError,
    InvalidAudio,
    ModelFailed,
    ModelLoadFailed,
    ModelManagerError,
    ModelNotFound,
    PullFailed,
    Timeout,
    UnknownOp,
    UnsupportedVersion,
)
from model_client.results import TextChunk, Timings, Usage

__all__ = [
    "Audio",
    "Speech",
    "SpeechStream",
    "Transcript",
    "BadRequest",
    "Busy",
    "Completion",
    "ContextOverflow",
    "Conversation",
    "InsufficientMemory",
    "InternalError",
    "InvalidAudio",
    "ModelClient",
    "ModelFailed",
    "ModelLoadFailed",
    "ModelManagerError",
    "ModelNotFound",
    "PullFailed",
    "Stream",
    "TextChunk",
    "Timings",
    "Usage",
    "Timeout",
    "UnknownOp",
    "UnsupportedVersion",
]
