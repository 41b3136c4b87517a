"""Pulls against a hub that turns hostile or flaky (``tests/hf_mirror.py``'s planted faults), through the real
manager: file names that lead out of the models folder, GGUF headers that declare 2^60 of something, 500s, 429s,
bodies that go silent, gated and private repos. Every pull ends with an answer of its own and a true reason, writes
nothing outside its folder, and leaves no empty folder behind.

The manager's pulls run here with a 1 s stall limit and short backoffs (``MM_PULL_STALL_S``,
``MM_PULL_BACKOFF_S``), and on small files, so the whole module takes seconds."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from model_client import ModelClient, PullFailed
from model_manager.footprint import MAX_HEADER_BYTES
from model_manager.kvcache import model_folder
from model_manager.pulls.paths import inside, unsafe_because
from model_manager.pulls.remote import HEADER_BLOCK
from model_manager.pulls.transport import _retry_after
from tests.conftest import ManagerProcess, base_config
from tests.hf_mirror import COMMIT, Fault, Mirror

STALL_S = 1.0
MIB = 1 << 20
BOMB_BYTES = 16 * MIB
TIMEOUT = 30.0  # a client's wait for each piece of a pull's progress
HOSTILE_NAMES = [
    "../../victim.txt",
    "sub/../../../victim.txt",
    "ABSOLUTE",  # replaced by the victim's absolute path
    "..\\..\\victim.txt",
    "C:/victim.txt",
    "c:victim.txt",
    "a//victim.txt",
    "./victim.txt",
    "sub/",
    "..",
    "a\x00b.txt",
    "a\nb.txt",
]


def tiny_gguf(path: Path, floats: int = 256 * 1024) -> Path:
    """A llama-shaped GGUF of about 1 MiB (one F32 tensor): big enough to be cut halfway, small to move."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_file_type(0)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_tensor("token_embd.weight", np.arange(floats, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def header_bomb(path: Path, what: str) -> Path:
    """A GGUF whose header declares 2^60 keys, tensors or array items, then zeros: each zero-filled entry parses."""
    huge = 2**60
    head = b"GGUF" + struct.pack("<I", 3)
    if what == "keys":
        head += struct.pack("<QQ", 0, huge)
    elif what == "tensors":
        head += struct.pack("<QQ", huge, 0)
    else:
        head += struct.pack("<QQ", 0, 1) + struct.pack("<Q", 5) + b"items" + struct.pack("<IIQ", 9, 8, huge)
    path.write_bytes(head + bytes(BOMB_BYTES - len(head)))
    return path


def skipping_bomb(path: Path) -> Path:
    """A GGUF header with one array of strings, each declaring a 300 KiB string: stepping over one is free to the
    parser, but each step lands in a new block to fetch (a sparse file: 90 MiB that take no disk)."""
    step, count = 300 * 1024, 300
    head = b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 5) + b"items"
    head += struct.pack("<IIQ", 9, 8, count)
    with open(path, "wb") as fh:
        fh.write(head)
        for i in range(count):
            fh.seek(len(head) + i * (8 + step))
            fh.write(struct.pack("<Q", step))
        fh.truncate(len(head) + count * (8 + step) + MIB)
    return path


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def mirror(run_dir: Path) -> Iterator[Mirror]:
    files = run_dir / "served"
    files.mkdir()
    tiny = tiny_gguf(files / "tiny-F32.gguf")
    weights, config = files / "model.bin", files / "config.json"
    weights.write_bytes(os.urandom(4096))
    config.write_text(json.dumps({"layers": 1}))
    payload = files / "payload.txt"
    payload.write_text("written by the hub\n")
    whisper = {"model.bin": weights, "config.json": config}
    repos = {f"local/{name}-GGUF": {"tiny-F32.gguf": tiny} for name in ("tiny", "flaky", "down", "busy", "stall")}
    repos.update({f"local/{name}-GGUF": {"tiny-F32.gguf": tiny} for name in ("silent", "gated", "private", "resume")})
    repos["local/gated-whisper"] = whisper
    for i, name in enumerate(HOSTILE_NAMES):
        name = str(run_dir / "victim.txt") if name == "ABSOLUTE" else name
        repos[f"local/evil-{i}"] = {**whisper, name: payload}
    repos["local/evil-link"] = {**whisper, "sub/victim.txt": payload}
    for what in ("keys", "tensors", "array"):
        repos[f"local/bomb-{what}-GGUF"] = {"bomb-Q4_K_M.gguf": header_bomb(files / f"bomb-{what}.gguf", what)}
    repos["local/bomb-skips-GGUF"] = {"bomb-Q4_K_M.gguf": skipping_bomb(files / "bomb-skips.gguf")}
    repos.update({f"local/listed-{how}-GGUF": {"tiny-F32.gguf": tiny} for how in LISTINGS})
    listed = {
        file_path(f"local/listed-{how}-GGUF", "tiny-F32.gguf"): {"lfs": {**lfs, "pointerSize": 134}}
        for how, lfs in LISTINGS.items()
    }
    plain = {"unsized.gguf": tiny}
    gated = {"local/gated-GGUF", "local/gated-whisper"}
    served = Mirror(repos=repos, plain=plain, gated=gated, listed=listed, unsized={"/files/unsized.gguf"}).start()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def puller(run_dir: Path, mirror: Mirror) -> Iterator[ManagerProcess]:
    path = run_dir / "manager"
    path.mkdir()
    process = ManagerProcess(path, base_config(path))
    settings = {"MM_PULL_STALL_S": str(STALL_S), "MM_PULL_BACKOFF_S": "0.05"}
    with environment(HF_ENDPOINT=mirror.url, HF_TOKEN=None, HF_HOME=str(run_dir / "hf-home"), **settings):
        process.start()  # the manager and its pull processes see this environment
    yield process
    process.stop()


def file_path(repo: str, name: str) -> str:
    return f"/{repo}/resolve/{COMMIT}/{name}"


def outcome(client: ModelClient, ref: str, **options) -> tuple[list[dict], dict | PullFailed]:
    """A pull's progress chunks and its final answer: the result, or the PullFailed it ended with."""
    chunks: list[dict] = []
    try:
        for item in client.pull(ref, timeout=TIMEOUT, **options):
            chunks.append(item)
    except PullFailed as exc:
        return chunks, exc
    return chunks[:-1], chunks[-1]


def refused(client: ModelClient, ref: str, **options) -> PullFailed:
    _, answer = outcome(client, ref, **options)
    assert isinstance(answer, PullFailed), answer
    return answer


def folder_of(puller: ManagerProcess, name: str) -> Path:
    return Path(puller.config["catalogue"]["models_dir"]) / model_folder(name).replace(":", "_")


def tree(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not p.name.endswith((".log", ".sock")) and not {"state", "kv"} & set(p.relative_to(root).parts)
    }


@pytest.mark.parametrize(("header", "seconds"), [("3", 3.0), (" 7 ", 7.0), ("²", None), ("-1", None), ("soon", None)])
def test_retry_after_is_read_as_seconds_or_a_date_and_nothing_else(header: str, seconds: float | None) -> None:
    assert _retry_after(header) == seconds


def test_only_plain_relative_names_are_taken_as_paths(tmp_path: Path) -> None:
    for name in ("model.bin", "en/en_US/joe/medium/en_US-joe-medium.onnx", "a..b.gguf", "...", "voix é.onnx"):
        assert unsafe_because(name) is None, name
        assert inside(tmp_path, name) == tmp_path / name
    for name in [n for n in HOSTILE_NAMES if n != "ABSOLUTE"] + ["/etc/passwd", "x" * 2000, "a/" + "b" * 300]:
        assert unsafe_because(name) is not None, name
        with pytest.raises(PullFailed):
            inside(tmp_path, name)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(PullFailed) as refused:
        inside(tmp_path, "link/x")
    assert refused.value.details == {"reason": "unsafe_path", "file": "link/x"}


def test_file_names_that_lead_out_of_the_models_folder_refuse_the_whole_pull(
    puller: ManagerProcess, mirror: Mirror, run_dir: Path
) -> None:
    victim = run_dir / "victim.txt"
    victim.write_text("planted\n")
    outside = run_dir / "outside"
    outside.mkdir()
    link_folder = folder_of(puller, "hf.co/local/evil-link")
    link_folder.mkdir(parents=True)
    (link_folder / "sub").symlink_to(outside)  # a link already in the models folder that leads out of it
    before = tree(run_dir)
    with puller.client(timeout=TIMEOUT) as client:
        for i, name in [*enumerate(HOSTILE_NAMES), ("link", "sub/victim.txt")]:
            name = str(victim) if name == "ABSOLUTE" else name
            error = refused(client, f"hf.co/local/evil-{i}")
            assert error.details["reason"] == "unsafe_path", (name, error)
            assert error.details["file"] == name and repr(name) in error.message, error.message
            fetched = [p for _, p, _ in mirror.log if p.startswith(f"/local/evil-{i}/")]
            assert fetched == [], f"{name!r}: nothing of the repo is fetched once one name is unsafe"
            if i != "link":
                assert not folder_of(puller, f"hf.co/local/evil-{i}").exists()
    assert victim.read_text() == "planted\n"
    assert list(outside.iterdir()) == []
    assert tree(run_dir) == before, "nothing was written anywhere"


@pytest.mark.parametrize("what", ["keys", "tensors", "array"])
def test_a_header_that_declares_2_to_the_60_entries_is_refused_after_a_few_bytes(
    puller: ManagerProcess, mirror: Mirror, what: str
) -> None:
    repo = f"local/bomb-{what}-GGUF"
    with puller.client(timeout=TIMEOUT) as client:
        error = refused(client, f"hf.co/{repo}")
    assert error.details["reason"] == "invalid_model" and str(2**60) in error.message, error
    assert what in error.message
    served = mirror.served.get(file_path(repo, "bomb-Q4_K_M.gguf"), 0)
    assert served < MIB, f"{served} bytes of a {BOMB_BYTES}-byte bomb were read"
    assert not folder_of(puller, f"hf.co/{repo}").exists()


def test_a_header_that_steps_far_at_each_item_is_refused_within_its_byte_cap(puller: ManagerProcess, mirror: Mirror):
    """The cap is on the bytes fetched, not on how far the parser has stepped: 300 items 300 KiB apart cost a block
    each to fetch (75 MiB) before the parser looked at its position."""
    repo = "local/bomb-skips-GGUF"
    with puller.client(timeout=TIMEOUT) as client:
        error = refused(client, f"hf.co/{repo}")
    assert error.details["reason"] == "invalid_model", error
    served = mirror.served.get(file_path(repo, "bomb-Q4_K_M.gguf"), 0)
    assert served <= MAX_HEADER_BYTES + HEADER_BLOCK, f"{served / MIB:.0f} MiB of the header were fetched"


LISTINGS = {  # what a hub may say of a (large, LFS) file, and what believing it would cost
    "empty-hash": {"size": 1, "sha256": ""},  # a hash that checks nothing
    "odd-hash": {"size": 1, "sha256": "Z" * 64},  # one that no download could match
    "no-size": {"size": None, "sha256": "0" * 64},  # nothing to check the disk or the download's end against
    "text-size": {"size": "many", "sha256": "0" * 64},
    "negative-size": {"size": -1, "sha256": "0" * 64},
}


@pytest.mark.parametrize("how", LISTINGS)
def test_what_a_hub_lists_of_a_file_is_checked_before_it_is_used(puller: ManagerProcess, mirror: Mirror, how: str):
    repo = f"local/listed-{how}-GGUF"
    with puller.client(timeout=TIMEOUT) as client:
        error = refused(client, f"hf.co/{repo}")
    assert error.details["reason"] == "bad_listing" and error.details["file"] == "tiny-F32.gguf", error
    assert mirror.served.get(file_path(repo, "tiny-F32.gguf"), 0) == 0, "nothing was fetched"
    assert not folder_of(puller, f"hf.co/{repo}").exists()


def test_a_url_whose_server_gives_no_size_is_refused_before_its_bytes(puller: ManagerProcess, mirror: Mirror):
    with puller.client(timeout=TIMEOUT) as client:
        error = refused(client, f"{mirror.url}/files/unsized.gguf")
    assert error.details["reason"] == "bad_listing" and "Content-Length" in error.message, error
    assert [method for method, path, _ in mirror.log if path == "/files/unsized.gguf"] == ["HEAD"], "nothing fetched"


def test_a_500_and_a_429_with_retry_after_are_waited_out(puller: ManagerProcess, mirror: Mirror) -> None:
    path = file_path("local/flaky-GGUF", "tiny-F32.gguf")
    mirror.faults["/api/models/local/flaky-GGUF"] = [Fault(status=500)]
    mirror.faults[path] = [Fault(status=500, whole=False), Fault(status=429, headers={"Retry-After": "1"}, whole=True)]
    with puller.client(timeout=TIMEOUT) as client:
        chunks, result = outcome(client, "hf.co/local/flaky-GGUF")
    assert isinstance(result, dict) and result["status"] == "success", result
    # (A stall of a second on a machine far busier than this one would be one more retry, said as "stalled".)
    retries = [(c["reason"], c["wait_s"]) for c in chunks if c["status"] == "retrying" and c["reason"] != "stalled"]
    assert [reason for reason, _ in retries] == ["server_error", "server_error", "rate_limited"], retries
    assert retries[-1][1] == 1, "a client waiting on the pull is told of each wait"
    whole = [at for at, method, wanted in mirror.requests_of(path) if method == "GET" and wanted is None]
    assert len(whole) >= 2 and whole[1] - whole[0] >= 0.95, "the second try waited the Retry-After second"


def test_a_server_that_keeps_failing_is_named_for_what_it_did(puller: ManagerProcess, mirror: Mirror) -> None:
    down, busy = file_path("local/down-GGUF", "tiny-F32.gguf"), file_path("local/busy-GGUF", "tiny-F32.gguf")
    mirror.faults[down] = [Fault(status=503) for _ in range(20)]
    mirror.faults[busy] = [Fault(status=429, headers={"Retry-After": "3600"}) for _ in range(20)]
    with puller.client(timeout=TIMEOUT) as client:
        error = refused(client, "hf.co/local/down-GGUF")
        assert error.details["reason"] == "server_error" and error.details["status"] == 503, error
        assert 2 < len(mirror.requests_of(down)) < 20, "a few tries, then the answer"
        error = refused(client, "hf.co/local/busy-GGUF")
        assert error.details["reason"] == "rate_limited" and error.details["retry_after_s"] == 3600, error
        assert len(mirror.requests_of(busy)) == 1, "an hour's wait is not waited: said at once"


def test_a_body_that_goes_silent_is_resumed_from_where_it_stopped(puller: ManagerProcess, mirror: Mirror) -> None:
    path = file_path("local/stall-GGUF", "tiny-F32.gguf")
    mirror.faults[path] = [Fault(stall=True, whole=False), Fault(stall=True, whole=True)]
    with puller.client(timeout=TIMEOUT) as client:
        _, result = outcome(client, "hf.co/local/stall-GGUF")
        # A success while the stalled connections are still open (the mirror releases them only when it stops): the
        # pull gave up on them rather than waiting.
        assert isinstance(result, dict) and result["status"] == "success", result
        gets = [wanted for _, method, wanted in mirror.requests_of(path) if method == "GET"]
        assert gets[0] == gets[1] and gets[0].startswith("bytes=0-"), "the stalled header range asked again"
        body = [wanted for wanted in gets if wanted is None or wanted.endswith("-")]
        assert body[0] is None and body[1].startswith("bytes=") and int(body[1][6:-1]) > 0, body

        silent = file_path("local/silent-GGUF", "tiny-F32.gguf")
        mirror.faults[silent] = [Fault(stall=True) for _ in range(20)]
        error = refused(client, "hf.co/local/silent-GGUF")
        assert error.details["reason"] == "stalled" and f"{STALL_S:g} s" in error.message, error


def test_a_download_that_fails_keeps_its_bytes_for_the_next_pull(puller: ManagerProcess, mirror: Mirror) -> None:
    path = file_path("local/resume-GGUF", "tiny-F32.gguf")
    mirror.faults[path] = [Fault(stall=True, whole=True)] + [Fault(status=503) for _ in range(20)]
    folder = folder_of(puller, "hf.co/local/resume-GGUF")
    with puller.client(timeout=TIMEOUT) as client:
        error = refused(client, "hf.co/local/resume-GGUF")
        kept = error.details.get("kept_bytes", 0)
        assert error.details["reason"] == "server_error" and kept > 0, error
        assert [p.name for p in folder.iterdir()] == ["tiny-F32.gguf.part"], "the part with its bytes, nothing else"
        assert (folder / "tiny-F32.gguf.part").stat().st_size == kept
        mirror.faults[path].clear()
        _, result = outcome(client, "hf.co/local/resume-GGUF")
    assert isinstance(result, dict) and result["status"] == "success", result
    last = [wanted for _, method, wanted in mirror.requests_of(path) if method == "GET"][-1]
    assert last == f"bytes={kept}-", "the next pull asked only for what was missing"


def test_a_gated_or_private_repo_says_so_and_names_hf_token(
    puller: ManagerProcess, mirror: Mirror, run_dir: Path
) -> None:
    mirror.faults[file_path("local/private-GGUF", "tiny-F32.gguf")] = [Fault(status=401)]
    with puller.client(timeout=TIMEOUT) as client:
        for ref in ("hf.co/local/gated-GGUF", "hf.co/local/gated-whisper"):
            error = refused(client, ref)
            assert error.details["reason"] == "gated" and error.details["token_set"] is False, error
            assert "HF_TOKEN" in error.message and "no HF_TOKEN is set" in error.message, error.message
            assert not folder_of(puller, ref).exists(), "a refused pull leaves no folder"
        error = refused(client, "hf.co/local/private-GGUF")
        assert error.details["reason"] == "unauthorized" and "HF_TOKEN" in error.message, error

    # With a token of an account that has no access, the hub answers 403: still gated, and the message says a token
    # was sent. The pull process on its own, as the manager starts it.
    env = {**os.environ, "HF_ENDPOINT": mirror.url, "HF_TOKEN": "hf_no_access", "HF_HOME": str(run_dir / "hf-home")}
    dest = run_dir / "alone"
    out = subprocess.run(
        [sys.executable, "-m", "model_manager.pulls", "--ref", "hf.co/local/gated-GGUF", "--dest", str(dest)],
        input="",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    ).stdout
    error = json.loads(out.splitlines()[-1])["error"]
    assert error["details"]["reason"] == "gated" and error["details"]["token_set"] is True, error
    assert "HF_TOKEN is set" in error["message"], error["message"]
    assert not dest.exists()


def test_a_pull_again_right_after_a_failure_gets_its_own_answer(puller: ManagerProcess) -> None:
    with puller.client(timeout=TIMEOUT) as client:
        for _ in range(5):
            first_chunks, first = outcome(client, "hf.co/local/gated-GGUF")
            again_chunks, again = outcome(client, "hf.co/local/gated-GGUF")
            for chunks, answer in ((first_chunks, first), (again_chunks, again)):
                assert isinstance(answer, PullFailed) and answer.details["reason"] == "gated", answer
                assert chunks and chunks[0]["status"] == "resolving", chunks


def test_a_check_leaves_no_folder(puller: ManagerProcess) -> None:
    models_dir = Path(puller.config["catalogue"]["models_dir"])
    existed = models_dir.exists()
    with puller.client(timeout=TIMEOUT) as client:
        _, result = outcome(client, "hf.co/local/tiny-GGUF", check=True)
    assert isinstance(result, dict) and result["check"] and result["fit"]["fits"], result
    assert not folder_of(puller, "hf.co/local/tiny-GGUF").exists()
    assert models_dir.exists() == existed
