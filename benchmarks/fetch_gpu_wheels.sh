#!/usr/bin/env bash
# Builds .whl/: the Python 3.12 manylinux wheels that the GPU machine lacks for
# benchmarks/gpu_suite.py (run from the repository root, on a machine that reaches PyPI).
#
# The GPU machine (device tool, kind nvidia-h200) has Python 3.12 with jax 0.11.2 + the CUDA 13
# plugin, flax, optax, orbax-checkpoint, chex, absl-py, pyyaml, pyarrow, rich, tokenizers,
# torch 2.11 and transformers 5.17 (/work/.library/device/KINDS.md), but no ml-collections,
# datasets or tensorboardX. What the suite imports (benchmarks/common.py -> configs/distilbert.py
# -> flaxdistil.training.setup ...) needs only ml-collections of those: datasets and tensorboardX
# are imported lazily by the data / metric-writer code the benchmarks never call
# (tests/test_gpu_suite.py checks the import graph). ml-collections' own requirements (absl-py,
# PyYAML) are there already, so it is fetched with --no-deps.
#
# The suite installs what lies here first of all, before anything else runs:
#   python3 -m pip install --no-index --no-deps --target DIR .whl/*.whl   (DIR goes on PYTHONPATH)
# and .whl/ (gitignored) travels to the GPU machine through the device tool's carry=['.whl'].
#
#   bash benchmarks/fetch_gpu_wheels.sh            # -> .whl/ml_collections-1.1.0-py3-none-any.whl
#   PIP=/path/to/pip bash benchmarks/fetch_gpu_wheels.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
DEST=.whl
# name==version, one per line: pinned so that every GPU session runs the same code.
WHEELS=(
  ml-collections==1.1.0
)

mkdir -p "$DEST"
$PIP download --dest "$DEST" --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 "${WHEELS[@]}"

# One version of each package only: two versions of one name stop `pip install` there.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "ERROR: several versions of: $dupes in $DEST; delete the stale wheels and rerun." >&2
  exit 1
fi
size=$(du -sm "$DEST" | cut -f1)
if [ "$size" -ge 64 ]; then
  echo "ERROR: $DEST is $size MiB; the device tool carries at most 64 MiB with the tree." >&2
  exit 1
fi
ls -l "$DEST"
echo "$DEST: $size MiB (limit 64 MiB with the working tree)"
