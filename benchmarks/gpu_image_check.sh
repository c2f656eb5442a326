#!/usr/bin/env bash
# The GPU machine's software, checked here on the CPU before any GPU time is spent (issue 22).
#
# The GPU image runs Python 3.12 with torch 2.11.0 (+cu130), transformers 5.17.0, accelerate 1.15.0,
# tokenizers 0.23.2, safetensors 0.8.0, numpy 2.5.2 and huggingface-hub 1.33.0, and lacks what
# benchmarks/gpu_wheels.sh puts into .whl/ (TRL, datasets, gymnasium, SB3 and their missing needs). textrl's
# own CI runs newer releases, so this script builds a virtual environment with the image's versions and, in it:
#   1. runs the default test suite (every CUDA test's body runs on the CPU there; the CUDA ones are skipped);
#   2. takes the wheelhouse's distributions out again, so the environment lacks what the image lacks, and runs
#      `GPU_SMOKE=1 GPU_INSTALL=1 bash benchmarks/gpu.sh`: the install from .whl/ exactly as on the GPU
#      machine, the imports, the CUDA tests collected, then peers.py (textrl, the plain loop, TRL GRPO) on a
#      tiny Qwen2 in bf16 on the CPU;
# and fails, naming the part, if any of that does not hold. What it cannot check is CUDA itself.
#
#     bash benchmarks/gpu_wheels.sh && bash benchmarks/gpu_image_check.sh    # ~15 minutes on 2 cores
#     bash benchmarks/gpu_image_check.sh --no-suite                          # part 2 alone, ~1 minute
#
# torch 2.11.0 comes from PyPI as its CUDA build (about 4.5 GB in the environment, which runs on the CPU).
# VENV (default /tmp/textrl-gpu-image) is kept between runs; OUT (default $VENV/out) gets the smoke's files.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-/tmp/textrl-gpu-image}
OUT=${OUT:-$VENV/out}
SUITE=1
[ "${1:-}" = "--no-suite" ] && SUITE=0
fail() {
    echo "gpu_image_check.sh: FAILED: $*" >&2
    exit 1
}
ls .whl/*.whl > /dev/null 2>&1 || fail "no wheels in .whl/: run benchmarks/gpu_wheels.sh first"

PY312=$(command -v python3.12 || true)
[ -n "$PY312" ] || {
    PY312=python3
    echo "gpu_image_check.sh: no python3.12 here; using $(python3 --version) (the image runs 3.12)" >&2
}
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
PY=$VENV/bin/python
CONSTRAINTS=$VENV/image-versions.txt
cat > "$CONSTRAINTS" << 'EOF'
torch==2.11.0
transformers==5.17.0
accelerate==1.15.0
tokenizers==0.23.2
safetensors==0.8.0
numpy==2.5.2
huggingface-hub==1.33.0
EOF
# the wheelhouse's own versions too, so that part 1 tests what part 2 installs (a wheel's name: NAME-VERSION-...)
names=()
for wheel in .whl/*.whl; do
    IFS=- read -r name version _ <<< "$(basename "$wheel")"
    names+=("$name")
    echo "$name==$version" >> "$CONSTRAINTS"
done
echo "+ installing the image's versions into $VENV"
"$PY" -m pip install -q torch==2.11.0
"$PY" -m pip install -q -c "$CONSTRAINTS" -e "$ROOT[test]"
"$PY" - << 'EOF'
import importlib.metadata as md
print("versions:", ", ".join(f"{n} {md.version(n)}" for n in ["torch", "transformers", "accelerate", "tokenizers",
      "safetensors", "numpy", "peft", "trl", "datasets", "gymnasium", "stable-baselines3"]))
EOF

# textrl's C++ kernels are built against this torch in a folder of their own
export TORCH_EXTENSIONS_DIR=$VENV/torch_extensions
if [ "$SUITE" = 1 ]; then
    echo "+ the default test suite"
    "$PY" -m pytest -q -m "not slow" -p no:cacheprovider tests textrl envs agents || fail "the test suite"
fi

echo "+ gpu.sh's install and smoke, without the wheelhouse's distributions"
"$PY" -m pip uninstall -q -y "${names[@]}"
rm -rf /tmp/site "$OUT"
PYTHON=$PY OUT=$OUT GPU_SMOKE=1 GPU_INSTALL=1 OMP_NUM_THREADS=1 bash benchmarks/gpu.sh > "$VENV/gpu.sh.log" 2>&1 ||
    fail "gpu.sh (log: $VENV/gpu.sh.log)"
grep -q "installing: " "$OUT/gpu.log" || fail "gpu.sh installed nothing from .whl/ ($OUT/gpu.log)"
! grep -E "FAILS|MISSING" "$OUT/env.txt" | grep -v -E "^(triton|nvidia)" ||
    fail "a package is missing or fails to import after the install ($OUT/env.txt)"
grep -q "tests: done" "$OUT/gpu.log" || fail "the CUDA tests did not run ($OUT/tests.txt)"
grep -q "peers qwen2-tiny: done" "$OUT/gpu.log" || fail "peers.py did not finish ($OUT/gpu.log)"
grep -q "^| TRL GRPOTrainer" "$OUT/peers-qwen2-tiny.md" || fail "no TRL GRPO row ($OUT/peers-qwen2-tiny.md)"
echo "gpu_image_check.sh: passed; the smoke's report: $OUT/peers-qwen2-tiny.md"
