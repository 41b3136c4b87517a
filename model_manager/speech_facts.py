"""What a speech model can do, read from its files without loading it: the languages a Whisper model hears and
a Piper voice speaks, and a voice's speakers. The catalogue (``models``) reports them, so a front end (the
Wyoming service, the gateway) can describe its voices and languages without waking a model."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

ENGLISH_ONLY_VOCABULARY = 51864  # Whisper's ``.en`` models; the multilingual ones have more tokens


def speech_facts(kind: str, path: str) -> dict[str, Any]:
    """``languages`` (and for a voice ``speakers`` and ``sample_rate``); empty when the files say nothing."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        return {}
    reader = {"stt": _whisper, "tts": _piper}.get(kind)
    return reader(path, stamp) if reader else {}


@functools.lru_cache(maxsize=64)
def _whisper(path: str, _stamp: int) -> dict[str, Any]:
    """A CTranslate2 Whisper directory: multilingual models list their language tokens in config.json."""
    directory = Path(path)
    try:
        tokens = (directory / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
        lang_ids = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("lang_ids") or []
    except (OSError, ValueError):
        return {}
    if len(tokens) <= ENGLISH_ONLY_VOCABULARY:
        return {"languages": ["en"]}
    languages = [tokens[i].strip("<|>") for i in lang_ids if isinstance(i, int) and 0 <= i < len(tokens)]
    return {"languages": languages}


@functools.lru_cache(maxsize=64)
def _piper(path: str, _stamp: int) -> dict[str, Any]:
    """A Piper voice's ``.onnx.json``: its language code and, for a multi-speaker voice, the speakers by name."""
    try:
        config = json.loads(Path(f"{path}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    language = (config.get("language") or {}).get("code") or (config.get("espeak") or {}).get("voice")
    names = config.get("speaker_id_map") or {}
    count = int(config.get("num_speakers") or 1)
    if names:
        speakers = [{"name": str(name), "id": int(sid)} for name, sid in sorted(names.items(), key=lambda i: i[1])]
    else:
        speakers = [{"name": str(i), "id": i} for i in range(count)] if count > 1 else []
    facts: dict[str, Any] = {"languages": [language] if language else [], "speakers": speakers}
    if (config.get("audio") or {}).get("sample_rate"):
        facts["sample_rate"] = int(config["audio"]["sample_rate"])
    return facts
