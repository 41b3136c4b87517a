"""Prepare the GPU run kit here, for a CUDA machine with no network that takes at most 64 MiB a transfer.

    .venv/bin/python scripts/gpu/prepare.py kit/      # then copy kit/ over and run `sh kit/run.sh` there

The folder holds: llama-cpp-python's sdist (the version installed here) repacked without its ``.git``,
``vendor/llama.cpp/models`` and ``docs`` (77 MB -> about 15 MB); Python 3.12 wheels (x86_64 Linux) of what the
manager's LLM path imports and of ``scikit-build-core`` to build the engine; this project's tracked files
(``git archive``); ``run.sh``. That machine needs CUDA with nvcc, CMake, ninja and Python 3.12 with numpy.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT_BYTES = 64 * 1024 * 1024
ENGINE = "llama-cpp-python"
# What `python -m model_manager` imports for an LLM, and what builds llama-cpp-python (numpy is on that machine).
WHEELS = [
    "pyzmq",
    "msgpack",
    "msgspec",
    "PyYAML",
    "structlog",
    "nvidia-ml-py",
    "psutil",
    "gguf",
    "tqdm",
    "prometheus-client",
    "diskcache",
    "Jinja2",
    "MarkupSafe",
    "typing-extensions",
    "scikit-build-core",
    "packaging",
    "pathspec",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]
DROPPED = (".git", "vendor/llama.cpp/models", "docs")  # relative to the sdist's top folder


def kept(member: tarfile.TarInfo) -> bool:
    """False for the sdist's parts the build does not need (a git checkout, test vocabularies, documentation)."""
    inside = member.name.split("/", 1)[1] if "/" in member.name else ""
    return not any(inside == d or inside.startswith(d + "/") for d in DROPPED)


def repack(sdist: Path, out: Path) -> None:
    with tarfile.open(sdist, "r:gz") as source, tarfile.open(out, "w:gz", compresslevel=9) as target:
        for member in source:
            if not kept(member):
                continue
            data = source.extractfile(member) if member.isfile() else None
            target.addfile(member, data)


def pinned(name: str) -> str:
    """The version installed here (what the tests ran), else the newest (the build's own tools)."""
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def pip_download(args: list[str], dest: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    out: Path = args.out
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    platform = [flag for p in PLATFORMS for flag in ("--platform", p)]
    abi = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    pip_download(["--only-binary", ":all:", *platform, *abi, *map(pinned, WHEELS)], wheels)
    download = out / "download"
    pip_download(["--no-binary", ":all:", pinned(ENGINE)], download)
    (sdist,) = download.glob("*.tar.gz")
    repack(sdist, out / sdist.name.replace(".tar.gz", "-slim.tar.gz"))
    shutil.rmtree(download)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar.gz", "HEAD"], check=True, capture_output=True
    )
    (out / "project.tar.gz").write_bytes(archive.stdout)
    shutil.copy(Path(__file__).with_name("run.sh"), out / "run.sh")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    listing = io.StringIO()
    for path in files:
        listing.write(f"{path.stat().st_size:>12}  {path.relative_to(out)}\n")
    (out / "MANIFEST.txt").write_text(listing.getvalue() + f"{total:>12}  in all\n")
    print(listing.getvalue() + f"{total / 2**20:.1f} MiB in all (limit {LIMIT_BYTES // 2**20} MiB)")
    if total > LIMIT_BYTES:
        sys.exit("the kit is over the transfer limit")


if __name__ == "__main__":
    main()
