"""Models pulled by reference from a local stand-in for the Hugging Face hub (``tests/hf_mirror.py``), served without
a restart; the fit told before the weights are fetched; resumed, verified, refused; removed, aliased, reloaded."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest
import yaml

from model_client import ModelClient, ModelNotFound, PullFailed
from model_client.errors import BadRequest, Busy
from model_manager.footprint import read_gguf_facts
from model_manager.pulls.refs import parse_ref
from model_manager.pulls.remote import remote_gguf_fields, resolve
from tests.conftest import GEMMA, SMOLLM2, VOICE, WHISPER, ManagerProcess, base_config, next_event, wait_for
from tests.hf_mirror import COMMIT, Mirror
from tests.test_gateway import running_stack
from tests.test_speech import wer

SMOL_FILE = SMOLLM2.name
SMOL_REPO = "local/SmolLM2-135M-Instruct-GGUF"
SMOL_PATH = f"/{SMOL_REPO}/resolve/{COMMIT}/{SMOL_FILE}"


def make_mirror() -> Mirror:
    return Mirror(
        repos={
            SMOL_REPO: {SMOL_FILE: SMOLLM2, "README.md": Path(__file__).parent.parent / "README.md"},
            "local/gemma-3-270m-GGUF": {GEMMA.name: GEMMA},
            "local/faster-whisper-tiny.en": {f.name: f for f in WHISPER.iterdir() if f.is_file()},
            "local/piper-joe": {f"en/{VOICE.name}": VOICE, f"en/{VOICE.name}.json": Path(f"{VOICE}.json")},
            "local/corrupt-GGUF": {"corrupt-Q4_1.gguf": SMOLLM2},
            "local/huge-GGUF": {"huge-Q4_K_M.gguf": SMOLLM2},
        },
        plain={"smol.gguf": SMOLLM2},
        corrupt={f"/local/corrupt-GGUF/resolve/{COMMIT}/corrupt-Q4_1.gguf"},
        listed_size={f"/local/huge-GGUF/resolve/{COMMIT}/huge-Q4_K_M.gguf": 10**15},
    ).start()


@pytest.fixture(scope="module")
def mirror() -> Iterator[Mirror]:
    served = make_mirror()
    before = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = served.url  # the manager (and its pull processes) inherit it
    yield served
    served.stop()
    if before is None:
        os.environ.pop("HF_ENDPOINT", None)
    else:
        os.environ["HF_ENDPOINT"] = before


@pytest.fixture(scope="module")
def puller(mirror: Mirror) -> Iterator[ManagerProcess]:
    path = Path(tempfile.mkdtemp(prefix="mm-"))
    process = ManagerProcess(path, base_config(path))
    process.start()
    yield process
    process.stop()
    shutil.rmtree(path, ignore_errors=True)


def pulled(client: ModelClient, ref: str, **options) -> tuple[list[dict], dict]:
    items = list(client.pull(ref, **options))
    return items[:-1], items[-1]


def test_references_parse_into_where_the_files_are() -> None:
    ref = parse_ref("hf.co/bartowski/SmolLM2-GGUF:Q4_K_M")
    assert (ref.repo, ref.quant, ref.default_name) == ("bartowski/SmolLM2-GGUF", "Q4_K_M", ref.text)
    ref = parse_ref("hf://rhasspy/piper-voices/en/en_US/joe/medium/en_US-joe-medium.onnx")
    assert ref.path == "en/en_US/joe/medium/en_US-joe-medium.onnx" and ref.default_name == "en_us-joe-medium"
    ref = parse_ref("https://example.com/m/Tiny-Q8_0.gguf#sha256=" + "a" * 64)
    assert ref.url == "https://example.com/m/Tiny-Q8_0.gguf" and ref.sha256 == "a" * 64
    for bad in ("llama3:70b", "hf://a/b/../../etc/passwd", "https://host", "https://x/y.gguf#md5=1", "", "x" * 600):
        with pytest.raises(BadRequest):
            parse_ref(bad)


def test_a_remote_header_gives_the_local_estimate_reading_a_sliver_of_the_file(mirror: Mirror) -> None:
    for local in (SMOLLM2, GEMMA):
        mirror.plain[local.name] = local
        source = resolve(parse_ref(f"{mirror.url}/files/{local.name}"))
        fields, tensor_bytes, reader = remote_gguf_fields(source.files[0])
        from model_manager.footprint import facts_from_fields

        assert facts_from_fields(fields, tensor_bytes) == read_gguf_facts(str(local))
        share = reader.fetched / local.stat().st_size
        print(f"{local.name}: header read {reader.fetched} bytes in {reader.requests} requests, {share:.2%}")
        if local == GEMMA:
            assert share <= 0.02, f"the check read {share:.2%} of Gemma's file"


def test_every_reference_form_pulls_a_model_that_answers_without_a_restart(
    puller: ManagerProcess, mirror: Mirror
) -> None:
    events = puller.subscribe()
    with puller.client(timeout=60) as client:
        pid = client.ping()["pid"]
        for ref, name in (
            (f"hf.co/{SMOL_REPO}:Q4_1", f"hf.co/{SMOL_REPO}:Q4_1"),
            (f"hf://{SMOL_REPO}/{SMOL_FILE}", "smollm2-135m-instruct.q4_1"),
            (f"{mirror.url}/files/smol.gguf", "smol"),
        ):
            progress, result = pulled(client, ref)
            statuses = [p["status"] for p in progress]
            assert statuses.index("fit") < statuses.index("verified"), "the fit is told before the weights come"
            fit = next(p for p in progress if p["status"] == "fit")
            assert fit["fits"] and fit["device"] == "cpu" and fit["variant"] == "Q4_1"
            assert result["model"] == name and result["added"], result
            topic, body, _ = next_event(events)
            while topic != "model.added":
                topic, body, _ = next_event(events)
            assert body["model"] == name
            reply = client.chat(name, [{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
            assert reply.text.strip()
        assert client.ping()["pid"] == pid, "no restart"
        entry = client.show(f"hf.co/{SMOL_REPO}:Q4_1")
        assert entry["origin"] == "pulled" and "{%" in entry["gguf"]["tokenizer.chat_template"]
        assert entry["source"]["files"][0]["sha256"] and entry["source"]["revision"] == COMMIT

        # In use, not removed under its client; once done, removed with its files.
        stream = client.chat("smol", [{"role": "user", "content": "Count to fifty."}], max_tokens=200, stream=True)
        next(iter(stream))
        with pytest.raises(Busy):
            client.remove("smol")
        for _ in stream:
            pass
        folder = Path(puller.config["catalogue"]["models_dir"]) / "smol"
        assert (folder / "smol.gguf").is_file()
        assert client.remove("smol")["freed_bytes"] == SMOLLM2.stat().st_size
        assert not folder.exists()
        with pytest.raises(ModelNotFound):
            client.chat("smol", [{"role": "user", "content": "Hi"}], max_tokens=4)


def test_a_voice_and_a_whisper_model_pulled_whole_speak_and_hear(puller: ManagerProcess) -> None:
    with puller.client(timeout=60) as client:
        assert pulled(client, "hf.co/local/piper-joe")[1]["kind"] == "tts"
        assert pulled(client, "hf.co/local/faster-whisper-tiny.en")[1]["kind"] == "stt"
        speech = client.synthesize("The weather is nice today.", voice="hf.co/local/piper-joe")
        heard = client.transcribe(speech.audio.to_wav(), model="hf.co/local/faster-whisper-tiny.en")
        assert wer("the weather is nice today", heard.text) < 0.3, heard.text


def test_a_connection_cut_mid_file_resumes_from_where_it_stopped(puller: ManagerProcess, mirror: Mirror) -> None:
    mirror.cut_once.add(SMOL_PATH)
    with puller.client(timeout=60) as client:
        _, result = pulled(client, f"hf.co/{SMOL_REPO}:Q4_1", name="smol-resumed")
    assert result["files"][0]["size"] == SMOLLM2.stat().st_size
    whole = [r for r in mirror.body_gets(SMOL_PATH) if r is None or r.endswith("-")]
    assert whole[-2] is None and whole[-1].startswith("bytes=") and int(whole[-1][6:-1]) > 0, whole


def test_a_flipped_byte_is_refused_and_nothing_enters_the_catalogue(puller: ManagerProcess) -> None:
    pulled_dir = Path(puller.config["catalogue"]["models_dir"])
    with puller.client(timeout=60) as client:
        with pytest.raises(PullFailed) as refused:
            pulled(client, "hf.co/local/corrupt-GGUF")
        assert refused.value.details["reason"] == "hash_mismatch" and "sha256" in refused.value.message
        assert "hf.co/local/corrupt-GGUF" not in {m["name"] for m in client.models()}
    leftovers = list(pulled_dir.glob("hf.co--local--corrupt-GGUF/*"))
    assert leftovers == [], "no partial or unverified file is kept"
    assert not list(Path(puller.config["catalogue"]["dir"]).glob("*corrupt*"))


def test_a_pull_larger_than_the_free_disk_is_refused_before_downloading(puller: ManagerProcess, mirror: Mirror) -> None:
    path = f"/local/huge-GGUF/resolve/{COMMIT}/huge-Q4_K_M.gguf"
    with puller.client(timeout=60) as client:
        with pytest.raises(PullFailed) as refused:
            pulled(client, "hf.co/local/huge-GGUF")
    assert refused.value.details["reason"] == "disk" and refused.value.details["needed_bytes"] == 10**15
    assert mirror.body_gets(path) == [], "not one byte of it was asked for"


def test_fragments_come_and_go_on_sighup_and_broken_ones_are_named(puller: ManagerProcess) -> None:
    folder = Path(puller.config["catalogue"]["dir"])
    folder.mkdir(exist_ok=True)
    events = puller.subscribe()
    (folder / "by-hand.yaml").write_text(
        yaml.safe_dump({"name": "by-hand", "model": {"kind": "llm", "path": str(SMOLLM2), "quantization": "Q4_1"}})
    )
    (folder / "broken.yaml").write_text("name: broken\nmodel: {kind: llm, path: x.gguf, n_ctx: many}\n")
    os.kill(puller.proc.pid, signal.SIGHUP)
    topic, body, _ = next_event(events)
    while topic != "model.added":
        topic, body, _ = next_event(events)
    assert body["model"] == "by-hand"
    with puller.client(timeout=60) as client:
        assert "n_ctx" in client.status()["catalogue"]["problems"]["broken.yaml"]
        assert client.copy("by-hand", "by-hand-too") == {"model": "by-hand-too", "alias_of": "by-hand"}
        before = sorted(folder.iterdir())
        for hostile in ("../../etc/x", "a/../b", "", "x" * 200):
            with pytest.raises(BadRequest):
                client.copy("by-hand", hostile)
        assert sorted(folder.iterdir()) == before, "a refused name writes no fragment"
        for taken in ("by-hand-too", "smollm2"):  # an alias, a model of the main YAML
            with pytest.raises(PullFailed) as refused:
                pulled(client, f"hf://{SMOL_REPO}/{SMOL_FILE}", name=taken)
            assert refused.value.details["reason"] == "exists"
        assert client.chat("by-hand-too", [{"role": "user", "content": "Hi"}], max_tokens=4).model == "by-hand"
        (folder / "by-hand.yaml").unlink()  # taken by the manager's own look at the folder
        wait_for(lambda: "by-hand" not in {m["name"] for m in client.models()}, timeout=10)
        assert SMOLLM2.is_file(), "a hand-written fragment's file is never deleted"


def test_mm_pull_check_tells_the_fit_of_gemma_from_a_sliver_of_its_file(puller: ManagerProcess) -> None:
    env = {**os.environ, "MM_ENDPOINT": puller.endpoint}
    out = subprocess.run(
        [sys.executable, "-m", "model_client.cli", "pull", "--check", "hf.co/local/gemma-3-270m-GGUF"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    print(out)
    assert "would load on cpu as Q4_K_M" in out and "253.1 MB to download" in out
    share = float(out.split("% of the file")[0].rsplit(" ", 1)[-1])
    assert share <= 2.0
    with ModelClient(puller.endpoint) as client:
        assert "hf.co/local/gemma-3-270m-GGUF" not in {m["name"] for m in client.models()}


def test_the_ollama_client_pulls_lists_shows_copies_and_deletes(mirror: Mirror) -> None:
    with running_stack({}) as stack:
        client = ollama.Client(host=stack.url)
        name = f"hf.co/{SMOL_REPO}:Q4_1"
        statuses = [p.status for p in client.pull(name, stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        assert any(s.startswith("fits on cpu") for s in statuses) and any(s.startswith("pulling ") for s in statuses)
        assert name in {m.model for m in client.list().models}
        shown = client.show(name)
        assert "{%" in shown.template and shown.details.quantization_level == "Q4_1" and "num_ctx" in shown.parameters
        client.copy(name, "my-smol")
        assert client.chat("my-smol", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 4}).done
        client.delete("my-smol")
        assert "my-smol" not in {m.model for m in client.list().models}
        client.delete(name)
        assert name not in {m.model for m in client.list().models}
        with pytest.raises(ollama.ResponseError) as missing:
            client.delete(name)
        assert missing.value.status_code == 404
