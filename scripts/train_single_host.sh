#!/usr/bin/env bash
# One host, all its accelerators (or CPU): the (data, fsdp) mesh spans the local devices.
#   scripts/train_single_host.sh configs/quickstart.py runs/qs [--config.parallel.mesh_shape=-1,2 ...]
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
exec prodclip train --config "$CONFIG" --workdir "$WORKDIR" "$@"
