#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker; jax.distributed.initialize
# finds the slice by itself (--multihost). WORKDIR should be a gs:// path or shared disk.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b scripts/train_tpu_pod.sh configs/quickstart.py gs://bucket/runs/qs
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-~/prodclip}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && .venv/bin/prodclip train --multihost --config $CONFIG --workdir $WORKDIR $*"
