"""Speech in the manager, against the real daemon: Piper speaks, Whisper listens, over real ZeroMQ sockets.

Every clip is made at test time by the manager's own Piper voice; other formats are encoded from it with PyAV.
"""

from __future__ import annotations

import io
import re
import threading

import av
import jiwer
import numpy as np
import pytest
import zmq

from model_client import Audio, InvalidAudio, ModelClient, protocol
from model_client.audio import read_wav
from model_client.errors import BadRequest, ModelNotFound
from tests.conftest import MAX_AUDIO_S, VOICE, ManagerProcess

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please turn off the lights in the kitchen before you go to bed.",
    "The meeting has been moved to Thursday afternoon.",
    "Can you tell me the weather forecast for tomorrow morning?",
    "A journey of a thousand miles begins with a single step.",
]


def wer(reference: str, heard: str) -> float:
    def norm(text: str) -> str:
        return re.sub(r"[^a-z' ]+", " ", text.lower()).strip()

    return jiwer.wer(norm(reference), norm(heard))


@pytest.fixture(scope="module")
def clips(manager: ManagerProcess) -> dict[str, bytes]:
    """One WAV per sentence, spoken by the manager's Piper voice."""
    with ModelClient(manager.endpoint, timeout=60) as client:
        return {text: client.synthesize(text).audio.to_wav() for text in SENTENCES}


def encode(wav: bytes, container: str, codec: str, rate: int | None = None, layout: str = "mono") -> bytes:
    """Re-encode a mono s16 WAV with PyAV (FFmpeg), as a user's recorder or phone would have saved it."""
    audio = read_wav(wav)
    samples = np.frombuffer(audio.pcm, dtype=np.int16)
    out = io.BytesIO()
    with av.open(out, "w", format=container) as output:
        # FFmpeg's own Vorbis encoder is marked experimental; it is good enough for a test clip.
        stream = output.add_stream(codec, rate=rate or audio.sample_rate, options={"strict": "experimental"})
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = audio.sample_rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=stream.rate)
        for part in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(part):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return out.getvalue()


def test_round_trip_piper_speaks_whisper_hears(client: ModelClient, clips: dict[str, bytes]) -> None:
    for text, wav in clips.items():
        transcript = client.transcribe(wav, model="whisper", language="en")
        assert wer(text, transcript.text) < 0.2, (text, transcript.text)
        assert transcript.language == "en" and transcript.model == "whisper"
        assert transcript.duration_s == pytest.approx(read_wav(wav).duration_s, abs=0.05)
        assert transcript.segments and transcript.segments[-1]["end"] <= transcript.duration_s + 0.5


def test_every_audio_format_decodes(client: ModelClient, clips: dict[str, bytes]) -> None:
    text, wav = SENTENCES[0], clips[SENTENCES[0]]
    files = {
        "wav": wav,
        "flac": encode(wav, "flac", "flac"),
        "mp3": encode(wav, "mp3", "libmp3lame", rate=22050),
        "ogg (vorbis)": encode(wav, "ogg", "vorbis", rate=22050, layout="stereo"),  # FFmpeg's encoder: stereo only
        "ogg (opus)": encode(wav, "ogg", "libopus", rate=48000),
    }
    assert files["flac"][:4] == b"fLaC" and files["ogg (opus)"][:4] == b"OggS"
    for name, data in files.items():
        heard = client.transcribe(data, model="whisper").text
        assert wer(text, heard) < 0.2, (name, heard)
    audio = read_wav(wav)
    mono = np.frombuffer(audio.pcm, dtype=np.int16)
    stereo = np.repeat(mono, 2).tobytes()  # the same samples on both channels
    heard = client.transcribe_pcm(Audio(stereo, audio.sample_rate, 2, 2), model="whisper").text
    assert wer(text, heard) < 0.2, ("pcm s16 stereo", heard)
    as_u8 = ((mono.astype(np.int32) >> 8) + 128).astype(np.uint8).tobytes()
    heard = client.transcribe_pcm(Audio(as_u8, audio.sample_rate, 1, 1), model="whisper").text
    assert wer(text, heard) < 0.2, ("pcm u8", heard)


def test_concurrent_transcriptions_are_batched_and_each_gets_its_own_text(
    manager: ManagerProcess, clips: dict[str, bytes]
) -> None:
    texts = SENTENCES[:4]
    results: dict[int, object] = {}
    start = threading.Barrier(len(texts))

    def transcribe(i: int) -> None:
        with ModelClient(manager.endpoint, timeout=60) as own:
            own.load("whisper")
            start.wait()
            results[i] = own.transcribe(clips[texts[i]], model="whisper")

    threads = [threading.Thread(target=transcribe, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == len(texts)
    for i, text in enumerate(texts):
        heard = results[i].text
        assert wer(text, heard) < 0.2, f"request {i} got {heard!r}, expected {text!r}"
    assert max(r.timings["batch"] for r in results.values()) > 1, "the concurrent requests ran one by one"


def test_bad_audio_gets_typed_errors_and_spoils_no_batch(
    manager: ManagerProcess, client: ModelClient, clips: dict[str, bytes]
) -> None:
    with pytest.raises(InvalidAudio, match="cannot decode"):
        client.transcribe(b"this is not audio at all" * 10, model="whisper")
    with pytest.raises(InvalidAudio, match="cannot decode"):
        client.transcribe(clips[SENTENCES[0]][:30], model="whisper")  # a WAV header cut short
    with pytest.raises(InvalidAudio, match="empty"):
        client.transcribe(b"", model="whisper")
    with pytest.raises(InvalidAudio, match="no audio samples"):
        client.transcribe(Audio(b"", 16000).to_wav(), model="whisper")
    with pytest.raises(InvalidAudio, match="not a whole number"):
        client.transcribe(b"\x00\x01\x02", model="whisper", format="pcm", sample_width=2)
    too_long = Audio(bytes(2 * 16000 * (MAX_AUDIO_S + 1)), 16000)
    with pytest.raises(InvalidAudio, match="over the limit") as raised:
        client.transcribe_pcm(too_long, model="whisper")
    assert raised.value.details == {"duration_s": MAX_AUDIO_S + 1.0, "max_audio_s": MAX_AUDIO_S}
    with pytest.raises(BadRequest, match="one binary frame"):
        client.request("transcribe", {"model": "whisper"})
    with pytest.raises(BadRequest, match="sample_width"):
        client.transcribe(b"\x00" * 6, model="whisper", format="pcm", sample_width=3)

    # Garbage and good clips sent together: the garbage fails alone.
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(manager.endpoint)
    try:
        sent = {}
        for i, audio in enumerate([clips[SENTENCES[1]], b"garbage" * 100, clips[SENTENCES[2]]]):
            request = protocol.Request(op="transcribe", args={"model": "whisper"}, payloads=(audio,))
            sent[request.id] = i
            sock.send_multipart([b"", *protocol.encode_request(request)])
        replies = {}
        for _ in sent:
            assert sock.poll(60_000), "no reply"
            reply = protocol.decode_reply(sock.recv_multipart()[1:])
            replies[sent[reply.id]] = reply
    finally:
        sock.close(linger=0)
    assert replies[1].type == "error" and replies[1].body["code"] == "invalid_audio"
    assert wer(SENTENCES[1], replies[0].body["text"]) < 0.2
    assert wer(SENTENCES[2], replies[2].body["text"]) < 0.2
    assert client.ping()["pong"] is True


def test_synthesize_streams_one_chunk_per_sentence(client: ModelClient) -> None:
    text = "Good morning. The coffee is ready. Have a nice day."
    stream = client.synthesize_stream(text, voice="joe")
    chunks = list(stream)
    assert len(chunks) == 3
    assert all(c.sample_rate == 22050 and c.sample_width == 2 and len(c.pcm) > 4000 for c in chunks)
    result = stream.result
    assert result is not None and result["format"] == "pcm" and result["model"] == "joe"
    total = sum(len(c.pcm) for c in chunks) / 2 / 22050
    assert result["duration_s"] == pytest.approx(total, abs=0.01)
    assert result["timings"]["first_chunk_ms"] < result["timings"]["synth_ms"]

    whole = client.synthesize(text, voice="joe", format="pcm")
    assert whole.audio.duration_s > 2.0
    faster = client.synthesize(text, voice="joe", speed=2.0)
    assert faster.audio.duration_s < 0.7 * whole.audio.duration_s


def test_synthesize_and_kind_errors(client: ModelClient) -> None:
    with pytest.raises(BadRequest, match="text is empty"):
        client.synthesize("   ")
    with pytest.raises(ModelNotFound, match="voice 'nobody'") as raised:
        client.synthesize("Hello.", voice="nobody")
    assert raised.value.details["available"] == ["joe"]
    with pytest.raises(BadRequest, match="format 'pcm'"):
        client.request("synthesize", {"text": "Hello.", "stream": True, "format": "wav"})
    with pytest.raises(BadRequest, match="needs a model of kind stt"):
        client.transcribe(b"RIFF", model="joe")
    with pytest.raises(BadRequest, match="needs a model of kind llm"):
        client.chat("whisper", [{"role": "user", "content": "hi"}])
    with pytest.raises(BadRequest, match="speed"):
        client.synthesize("Hello.", speed=0)


def test_speech_models_show_in_status_with_kind_and_measured_size(client: ModelClient) -> None:
    client.load("whisper")
    client.load("joe")
    models = {m["name"]: m for m in client.status()["models"]}
    for name, kind in (("whisper", "stt"), ("joe", "tts")):
        entry = models[name]
        assert entry["kind"] == kind and entry["state"] == "ready" and entry["device"] == "cpu"
        assert entry["measured_bytes"] and 0.5 < entry["measured_bytes"] / entry["estimated_bytes"] < 1.5
    catalogue = {m["name"]: m for m in client.models()}
    assert catalogue["whisper"]["file_exists"] and catalogue["whisper"]["file_bytes"] > 70_000_000


def test_a_voice_booked_on_a_gpu_runs_on_that_gpu() -> None:
    """ONNX Runtime gets the GPU the manager placed the voice on (Piper's own loader always takes GPU 0)."""
    from model_manager.backends.piper import session_providers
    from model_manager.config import ModelSpec

    def voice(**kw) -> ModelSpec:
        return ModelSpec(kind="tts", path=str(VOICE), **kw)

    cuda = {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}
    assert session_providers(voice(device="cuda", gpu=1)) == [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    assert session_providers(voice(device="cuda"))[0][1]["device_id"] == 0
    assert session_providers(voice(device="cpu", n_threads=1)) == ["CPUExecutionProvider"]
