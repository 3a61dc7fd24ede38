#!/usr/bin/env bash
# Run flaxdistil on every worker of a Cloud TPU VM slice, after checking that the step fits.
#
#   ./launch_tpu.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   ./launch_tpu.sh my-v4-32 us-central2-b configs/distilbert.py /mnt/gcs/runs/distil1
#
# Copies this repo to each worker (~/flaxdistil), creates/reuses a venv there and installs the
# package with its tpu extra (jax[tpu]) and no torch: torch is in the export extra only (it reads
# .bin teachers and verifies exports; export on a CPU machine, or add `pip install torch==2.13.0
# --index-url https://download.pytorch.org/whl/cpu` -- PyPI's torch is a multi-GB CUDA build).
# Then worker 0 compiles the train step for the slice (python -m flaxdistil.train_compile,
# docs/scaling.md) and the launch stops there when the step does not fit in HBM (exit code 3) or
# the config is bad (2); the report is printed. Finally the same training command starts on all
# workers at once; jax.distributed.initialize() inside main.py finds the other hosts from the TPU
# metadata. WORKDIR must be a shared filesystem path (a gcsfuse mount or NFS) so that every host
# writes its checkpoint shards to the same place.
# Environment: PROJECT (gcloud project, optional), VENV (default ~/flaxdistil-venv),
# SKIP_COMPILE_CHECK=1 to launch without the check.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,20p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
EXTRA=("$@")
VENV=${VENV:-'~/flaxdistil-venv'}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=$(cd "$(dirname "$0")" && pwd)

gssh() {  # gssh WORKER COMMAND
  # shellcheck disable=SC2086
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker="$1" \
    --command="$2"
}

echo ">> copying repo to all workers of $TPU_NAME"
tar -C "$REPO_DIR" --exclude=.git --exclude=runs -czf /tmp/flaxdistil.tgz .
# shellcheck disable=SC2086
gcloud compute tpus tpu-vm scp /tmp/flaxdistil.tgz "$TPU_NAME":/tmp/flaxdistil.tgz \
  --zone="$ZONE" $PROJECT_FLAG --worker=all

echo ">> venv + the package with its tpu extra (reused when present)"
gssh all "set -e; mkdir -p ~/flaxdistil && tar -xzf /tmp/flaxdistil.tgz -C ~/flaxdistil;
  [ -d $VENV ] || python3 -m venv $VENV;
  $VENV/bin/pip install -q -U pip;
  $VENV/bin/pip install -q -e ~/flaxdistil'[tpu]' \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

printf -v EXTRA_Q '%q ' "${EXTRA[@]}"
if [[ "${SKIP_COMPILE_CHECK:-0}" != 1 ]]; then
  # shellcheck disable=SC2086
  ACCEL=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
    --format='value(acceleratorType)')
  echo ">> compile check on worker 0 for $ACCEL"
  # JAX_PLATFORMS=cpu: the check leaves the slice's TPUs alone (compile-only devices of the
  # topology); it must not start a TPU runtime that waits for the other hosts.
  set +e
  gssh 0 "cd ~/flaxdistil && JAX_PLATFORMS=cpu $VENV/bin/python -m flaxdistil.train_compile \
    --config $CONFIG --topology $ACCEL --json_out /tmp/train_compile.json ${EXTRA_Q}"
  rc=$?
  set -e
  if [[ $rc -eq 3 ]]; then
    echo ">> the step does not fit on $ACCEL: not launching. Try a smaller microbatch"
    echo "   (--config.optim.num_microbatches), distill.vocab_chunk_size, remat=True, or"
    echo "   python -m flaxdistil.train_compile --config $CONFIG --topology $ACCEL --search"
    exit 3
  elif [[ $rc -ne 0 ]]; then
    echo ">> compile check failed (exit $rc): not launching (SKIP_COMPILE_CHECK=1 skips it)"
    exit "$rc"
  fi
fi

echo ">> training on all workers"
gssh all "cd ~/flaxdistil && $VENV/bin/python -m flaxdistil.main --multihost \
  --config $CONFIG --workdir $WORKDIR ${EXTRA_Q}"
