#!/bin/sh
# The GPU checks on a bare CUDA machine, from the folder scripts/gpu/prepare.py made (no network needed): one
# command, about 4 minutes of engine build then 3 to 5 of checks on an H200 (16 cores), within a 15-minute lease.
#
#   sh kit/run.sh [--size-mib 1500] [--arch 90] [--out DIR]     -> DIR/report.json (default kit/target)
#
# Uses the machine's own Python 3.12 with its numpy, CMake, ninja and scikit-build-core (python3, or $PYTHON);
# installs the kit's wheels and the engine beside it (pip --target, on PYTHONPATH: no venv, which would hide
# that Python's packages), builds llama-cpp-python with CUDA for one architecture, unpacks the project, writes a
# synthetic GGUF of the size asked and runs scripts/gpu/checks.py, whose report is rewritten as each check
# completes. The build log is DIR/build.log. Nothing is preloaded by hand: the manager's workers take the shared
# C++ runtime themselves (model_manager/native.py), and the report's `runtime` check shows the clash without it.
#
#   sh scripts/gpu/run.sh --dry [--out DIR]   (from a checkout, on any machine: what the test suite runs)
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
    mkdir -p "${OUT:-.}"
    exec "$PY" "$HERE/scripts/gpu/checks.py" --dry --size-mib "${SIZE_DRY:-96}" --out "${OUT:-.}/report.json"
fi

KIT=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$KIT/target}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/mm-gpu-site}
PROJECT=${PROJECT:-/tmp/mm-gpu-project}
PY=${PYTHON:-python3}
mkdir -p "$SITE" "$PROJECT"
export PYTHONPATH="$SITE:$PROJECT"

"$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$SITE" "$KIT"/wheels/*.whl
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    started=$(date +%s)
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH-real -DLLAVA_BUILD=OFF -DGGML_CUDA_NCCL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PY" -m pip install --no-index --no-build-isolation --no-deps --no-compile --target "$SITE" \
        "$KIT"/llama_cpp_python-*-slim.tar.gz > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
    echo "engine built in $(( $(date +%s) - started )) s"
fi
tar xzf "$KIT/project.tar.gz" -C "$PROJECT"
cd "$PROJECT"
PYTHONUNBUFFERED=1 "$PY" scripts/gpu/checks.py --size-mib "$SIZE" --out "$OUT/report.json"
echo "report: $OUT/report.json"
