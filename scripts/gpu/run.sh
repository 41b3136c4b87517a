#!/bin/sh
# The GPU checks on a bare CUDA machine, from the folder scripts/gpu/prepare.py made (no network needed):
#
#   sh kit/run.sh [--size-mib 1500] [--arch 90]      -> kit/target/report.json
#
# Builds llama-cpp-python with CUDA into kit/target/venv (a venv over the system Python 3.12 and its numpy), unpacks
# this project beside it, writes a synthetic GGUF of the size asked and runs scripts/gpu/checks.py.
#
#   sh scripts/gpu/run.sh --dry [--out report.json]   (from a checkout, on any machine: what the test suite runs)
#
# skips the build and runs the checks on the CPU with the interpreter in $PYTHON (default .venv/bin/python).
set -eu

DRY=0
SIZE=1500
ARCH=90
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry) DRY=1 ;;
        --size-mib) SIZE="$2"; shift ;;
        --arch) ARCH="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$DRY" = 1 ]; then
    HERE=$(cd "$(dirname "$0")/../.." && pwd)
    PY=${PYTHON:-$HERE/.venv/bin/python}
    exec "$PY" "$HERE/scripts/gpu/checks.py" --dry --size-mib "${SIZE_DRY:-96}" --out "${OUT:-report.json}"
fi

KIT=$(cd "$(dirname "$0")" && pwd)
TARGET="$KIT/target"
mkdir -p "$TARGET"
OUT=${OUT:-$TARGET/report.json}
PY=${PYTHON:-python3.12}

if [ ! -x "$TARGET/venv/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$TARGET/venv"
fi
VPY="$TARGET/venv/bin/python"
"$VPY" -m pip install --no-index --find-links "$KIT/wheels" --no-deps "$KIT"/wheels/*.whl
if ! "$VPY" -c "import llama_cpp" 2>/dev/null; then
    # The build needs nvcc, CMake and ninja from the system; scikit-build-core comes from the wheels above.
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH" \
        "$VPY" -m pip install --no-index --no-build-isolation --no-deps -v "$KIT"/llama_cpp_python-*-slim.tar.gz \
        > "$TARGET/build.log" 2>&1 || { tail -50 "$TARGET/build.log"; exit 1; }
fi
mkdir -p "$TARGET/project"
tar xzf "$KIT/project.tar.gz" -C "$TARGET/project"
cd "$TARGET/project"
"$VPY" scripts/gpu/checks.py --size-mib "$SIZE" --out "$OUT"
echo "report: $OUT"
