#!/usr/bin/env bash
# Build the wheelhouse that benchmarks/gpu.sh installs on the GPU machine, which cannot reach a registry.
#
# That machine's image (Python 3.12, x86-64) has torch, transformers, peft, accelerate, pandas, pyarrow,
# huggingface-hub, fsspec, xxhash, tensorboard, pytest and hypothesis, but not what textrl's envs and the
# peers need: gymnasium (+ farama-notifications), stable-baselines3, and TRL with the parts of its needs the
# image lacks (datasets, dill, multiprocess). All are pure-Python wheels, about 3 MB together; the versions are
# the ones textrl is tested with. gpu.sh installs only the wheels whose distribution the image lacks.
#
#     bash benchmarks/gpu_wheels.sh          # -> .whl/ (git-ignored through .git/info/exclude)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
    gymnasium==1.4.0 farama-notifications==0.0.6 stable-baselines3==2.9.2
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)
if ! git check-ignore -q .whl/x.whl; then
    echo "gpu_wheels.sh: .whl/ is not git-ignored; add it first: echo /.whl/ >> .git/info/exclude" >&2
    exit 1
fi
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
ls -l .whl/*.whl
du -ch .whl/*.whl | tail -1
