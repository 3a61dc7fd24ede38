#!/usr/bin/env bash
# Run flaxdistil on every worker of a Cloud TPU VM slice.
#
#   ./launch_tpu.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   ./launch_tpu.sh my-v4-32 us-central2-b configs/distilbert.py /mnt/gcs/runs/distil1
#
# Copies this repo to each worker (~/flaxdistil), creates/reuses a venv there,
# installs the package with its tpu extra (jax[tpu]), and starts the same command on all
# workers at once; jax.distributed.initialize() inside main.py finds the other
# hosts from the TPU metadata. WORKDIR must be a shared filesystem path (a gcsfuse
# mount or NFS) so that every host writes its checkpoint shards to the same place.
# Environment: PROJECT (gcloud project, optional), VENV (default ~/flaxdistil-venv).
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,13p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
EXTRA=("$@")
VENV=${VENV:-'~/flaxdistil-venv'}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=$(cd "$(dirname "$0")" && pwd)

gssh() {
  # shellcheck disable=SC2086
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

echo ">> copying repo to all workers of $TPU_NAME"
tar -C "$REPO_DIR" --exclude=.git --exclude=runs -czf /tmp/flaxdistil.tgz .
# shellcheck disable=SC2086
gcloud compute tpus tpu-vm scp /tmp/flaxdistil.tgz "$TPU_NAME":/tmp/flaxdistil.tgz \
  --zone="$ZONE" $PROJECT_FLAG --worker=all

echo ">> venv + requirements (reused when present)"
gssh "set -e; mkdir -p ~/flaxdistil && tar -xzf /tmp/flaxdistil.tgz -C ~/flaxdistil;
  [ -d $VENV ] || python3 -m venv $VENV;
  $VENV/bin/pip install -q -U pip;
  $VENV/bin/pip install -q -e ~/flaxdistil'[tpu]' \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

printf -v EXTRA_Q '%q ' "${EXTRA[@]}"
echo ">> training on all workers"
gssh "cd ~/flaxdistil && $VENV/bin/python -m flaxdistil.main --multihost \
  --config $CONFIG --workdir $WORKDIR ${EXTRA_Q}"
