"""What the Wyoming ports describe, from a cached copy of the manager's catalogue: Home Assistant gives
``describe`` one second, and a busy or restarting manager must not make it miss that. The copy is refreshed in the
background; ``describe`` never waits for the manager."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from wyoming.event import Event
from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    HandleModel,
    HandleProgram,
    Info,
    TtsProgram,
    TtsVoice,
    TtsVoiceSpeaker,
)

from model_client.aio import ManagerLink
from model_client.errors import ModelManagerError
from personas.config import Persona

PROJECT = Attribution(name="ModelManagerAgent", url="")
WHISPER = Attribution(name="OpenAI Whisper (faster-whisper)", url="https://github.com/SYSTRAN/faster-whisper")
PIPER = Attribution(name="Piper", url="https://github.com/rhasspy/piper")
ASR_PROGRAM = "model-manager-stt"
TTS_PROGRAM = "model-manager-tts"
VERSION = "1"

log = structlog.get_logger("wyoming")


def short_language(code: str) -> str:
    """``en_US`` / ``en-US`` -> ``en``: Whisper takes the base language."""
    return code.replace("_", "-").split("-")[0].lower()


class Catalogue:
    def __init__(self, link: ManagerLink, personas: dict[str, Persona], refresh_s: float) -> None:
        self.link = link
        self.personas = personas
        self.refresh_s = refresh_s
        self.models: list[dict[str, Any]] = []

    async def refresh(self) -> None:
        try:
            self.models = (await self.link.request("models", {}, timeout_s=10))["models"]
        except ModelManagerError as exc:
            log.warning("catalogue_refresh_failed", code=exc.code, message=exc.message)

    async def keep_fresh(self) -> None:
        """After the first ``refresh`` (awaited at start): again every ``refresh_s``."""
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.models if m.get("kind") == kind]

    def voice(self, name: str | None) -> dict[str, Any] | None:
        voices = self.of_kind("tts")
        return next((v for v in voices if v["name"] == name), None) if name else (voices[0] if voices else None)

    def voice_for_language(self, language: str) -> str | None:
        for voice in self.of_kind("tts"):
            codes = voice.get("languages") or []
            if language in codes or short_language(language) in map(short_language, codes):
                return voice["name"]
        return None

    # ----- info events -------------------------------------------------------------------------------------

    def asr_info(self) -> Event:
        models = [
            AsrModel(
                name=m["name"],
                attribution=WHISPER,
                installed=bool(m.get("file_exists", True)),
                description=m.get("description") or m["name"],
                version=None,
                languages=list(m.get("languages") or []),
            )
            for m in self.of_kind("stt")
        ]
        program = AsrProgram(
            name=ASR_PROGRAM,
            attribution=PROJECT,
            installed=True,
            description="Speech to text by the model manager's Whisper models",
            version=VERSION,
            models=models,
        )
        return Info(asr=[program]).event()

    def tts_info(self) -> Event:
        voices = []
        for m in self.of_kind("tts"):
            speakers = [TtsVoiceSpeaker(name=s["name"]) for s in m.get("speakers") or []]
            voices.append(
                TtsVoice(
                    name=m["name"],
                    attribution=PIPER,
                    installed=bool(m.get("file_exists", True)),
                    description=m.get("description") or m["name"],
                    version=None,
                    languages=list(m.get("languages") or []),
                    speakers=speakers or None,
                )
            )
        program = TtsProgram(
            name=TTS_PROGRAM,
            attribution=PROJECT,
            installed=True,
            description="Text to speech by the model manager's Piper voices",
            version=VERSION,
            voices=voices,
            supports_synthesize_streaming=True,
        )
        return Info(tts=[program]).event()

    def handle_info(self, persona_name: str) -> Event:
        persona = self.personas[persona_name]
        model = HandleModel(
            name=persona.model,
            attribution=PROJECT,
            installed=any(m["name"] == persona.model for m in self.models) or not self.models,
            description=persona.description or persona.model,
            version=None,
            languages=[],  # any: the persona's prompt decides
        )
        program = HandleProgram(
            name=persona.display_name or persona_name,
            attribution=PROJECT,
            installed=True,
            description=persona.description or f"the {persona_name} persona",
            version=VERSION,
            models=[model],
            supports_handled_streaming=True,
        )
        return Info(handle=[program]).event()
