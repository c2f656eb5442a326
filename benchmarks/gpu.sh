#!/usr/bin/env bash
# textrl on one NVIDIA GPU (issue 22): the CUDA tests, then textrl against TRL GRPO and a plain loop in bf16.
#
# Made for a machine lent for ~15 minutes with an H200, no registry and an image with torch, transformers and
# peft but not gymnasium, stable-baselines3 or TRL. Build the wheelhouse here first (benchmarks/gpu_wheels.sh,
# ~3 MB into .whl/), then on the GPU machine, from the repository root:
#
#     bash benchmarks/gpu.sh        # 7 minutes at most (GPU_BUDGET seconds, default 420); results in $OUT
#
# (the device tool: command "bash benchmarks/gpu.sh", carry [".whl"], timeout_s 450). Parts, in order, each
# under `timeout` and within what is left of GPU_BUDGET:
#   1. install the wheels of .whl/ whose distribution the image lacks into /tmp/site (PYTHONPATH);
#   2. the machine: nvidia-smi, torch/CUDA/library versions ($OUT/env.txt);
#   3. the CUDA tests: pytest -m cuda tests/test_cuda.py ($OUT/tests.txt; ~2 min);
#   4. peers.py on cuda in bf16, a random Qwen2-0.5B-shaped model, B = 64, 128-token prompts, 256 new tokens:
#      textrl REINFORCE, TRL GRPO, textrl PPO, the plain loop, textrl GRPO; textrl with CUDA-graph decode steps;
#      the decode alone against the bandwidth bound; MFU of the update; peak GPU memory
#      ($OUT/peers-qwen2-0.5b.md; every finished run also in $OUT/peers.jsonl; progress in $OUT/gpu.log);
#   5. the same with a random Llama-3.2-1B-shaped model ($OUT/peers-llama-1b.md);
#   6. if time is left, the decode alone with torch.compile'd steps ($OUT/decode-compile.md).
# GPU_PARTS (default "tests qwen2-0.5b llama-1b compile") names the parts 3-6 to run. 15 minutes of device time
# hold two calls, a machine's start included, but not two of 9 minutes: the default budget runs the parts the
# targets need (3 and 4) and gives 5 and 6 what is left, which leaves time for a second call, either a rerun
# after a fix or the rest:
#     GPU_PARTS="llama-1b compile" GPU_BUDGET=240 bash benchmarks/gpu.sh        # timeout_s 270
# $OUT defaults to benchmarks/results/gpu-<date>/ and gets at most 7 files (the device tool brings back 8).
# A part that fails or runs out of time is logged and the script goes on; it exits 0 once it has run, whatever
# the parts did ($OUT/gpu.log says what each did). A peers part cut short still writes its report, of the runs
# it finished (peers.py takes SIGTERM as Ctrl-C), and each of those is in peers.jsonl too.
#
# GPU_SMOKE=1: the same script on the CPU in ~30 s (the test suite runs it): no install, the tests collected
# and skipped, one tiny random Qwen2 (peers.py --shape qwen2-tiny, B = 4, 16 + 8 tokens, in one process) with
# made-up peaks, so the report's GPU section is built; no part 5 or 6. GPU_INSTALL=1 makes the smoke install
# the wheels too (part 1), as on the GPU machine: benchmarks/gpu_image_check.sh uses it.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
SMOKE=${GPU_SMOKE:-0}
INSTALL=${GPU_INSTALL:-$([ "$SMOKE" = 0 ] && echo 1 || echo 0)}
OUT=${OUT:-$ROOT/benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${GPU_BUDGET:-420}
PARTS=${GPU_PARTS:-tests qwen2-0.5b llama-1b compile}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

log() { echo "== $(date +%T) (+$(($(date +%s) - START)) s) $*" | tee -a "$OUT/gpu.log"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
wants() { [[ " $PARTS " == *" $1 "* ]]; } # wants PART: named in GPU_PARTS
part() { # part NAME SECONDS FILE COMMAND...: under timeout, at most what is left of the budget (minus 10 s),
    # its output shown and appended to $OUT/FILE
    local name=$1 want=$2 file=$OUT/$3
    shift 3
    local allowed
    allowed=$(($(left) - 10))
    if [ "$allowed" -lt 20 ]; then
        log "$name: skipped, $(left) s left of the budget"
        return 0
    fi
    [ "$want" -lt "$allowed" ] && allowed=$want
    log "$name: start (at most $allowed s)"
    timeout -k 10 "$allowed" "$@" 2>&1 | tee -a "$file"
    local rc=${PIPESTATUS[0]}
    case $rc in
        0) log "$name: done" ;;
        124 | 137) log "$name: TIMED OUT after $allowed s" ;;
        *) log "$name: FAILED (exit $rc)" ;;
    esac
    return 0
}

# 1. the wheels the image lacks
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [ "$INSTALL" = 1 ] && ls .whl/*.whl > /dev/null 2>&1; then
    missing=$("$PY" - << 'EOF'
import glob, importlib.metadata as md, re, sys
for wheel in sorted(glob.glob(".whl/*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.split("/")[-1].split("-")[0]).lower()
    try:
        print(f"present: {name} {md.version(name)}", file=sys.stderr)
    except md.PackageNotFoundError:
        print(wheel)
EOF
    )
    if [ -n "$missing" ]; then
        log "installing: $(echo $missing | tr '\n' ' ')"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $missing \
            2>&1 | tee -a "$OUT/gpu.log"
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    fi
fi

# 2. the machine
{
    date
    command -v nvidia-smi > /dev/null && nvidia-smi
    "$PY" - << 'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
for name in ["transformers", "peft", "accelerate", "trl", "datasets", "pyarrow", "pandas", "fsspec",
             "huggingface-hub", "gymnasium", "stable-baselines3", "numpy", "triton"]:
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
for module in ["trl", "gymnasium", "stable_baselines3", "agents"]:
    try:
        __import__(module)
    except Exception as e:
        print("import", module, "FAILS:", type(e).__name__, e)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 3. the CUDA tests (all skipped without a GPU: the smoke collects them)
per_test=()
"$PY" -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout 90)
wants tests && part tests 150 tests.txt "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --maxfail 10 "${per_test[@]}"

# 4.-5. textrl vs TRL GRPO vs the plain loop
peers() { # peers SHAPE SECONDS PER-RUN-TIMEOUT ITERS EXTRA...
    local shape=$1 seconds=$2 per_run=$3 iters=$4
    shift 4
    part "peers $shape" "$seconds" gpu.log "$PY" benchmarks/peers.py --device cuda --dtype bf16 --shape "$shape" \
        --batch-sizes 64 --prompt-tokens 128 --new-tokens 256 --decode-step graph --rounds 1 --warmup 1 \
        --iters "$iters" --timeout "$per_run" --log "$OUT/peers.jsonl" --out "$OUT/peers-$shape.md" "$@"
}
if [ "$SMOKE" = 0 ]; then
    wants qwen2-0.5b && peers qwen2-0.5b 270 100 2 --systems reinforce grpo ppo plain textrl-grpo
    wants llama-1b && peers llama-1b 200 80 1 --systems reinforce grpo ppo plain
    wants compile && part "decode compile" 120 decode-compile.md "$PY" benchmarks/engine_decode.py --device cuda \
        --dtype bf16 --shape qwen2-0.5b --batch-sizes 64 --prompt-len 128 --new-tokens 256 --rounds 2 \
        --decode-steps eager graph compile
else
    systems=(reinforce plain)
    "$PY" -c "import trl" 2> /dev/null && systems+=(grpo)
    part "peers qwen2-tiny" 120 gpu.log "$PY" benchmarks/peers.py --device cpu --dtype bf16 --shape qwen2-tiny \
        --batch-sizes 4 --prompt-tokens 16 --new-tokens 8 --decode-step graph --rounds 1 --warmup 1 --iters 1 \
        --in-process --threads 1 --peak-tflops 0.1 --peak-bandwidth 0.02 --decode-repeats 1 \
        --log "$OUT/peers.jsonl" --out "$OUT/peers-qwen2-tiny.md" --systems "${systems[@]}"
fi
log "end; $OUT: $(ls "$OUT" | tr '\n' ' ')"
