#!/usr/bin/env bash
# One host, all its accelerators (or CPU): the (data, fsdp) mesh spans the local devices.
#   scripts/train_single_host.sh configs/quickstart.py runs/qs [--config.parallel.mesh_shape=-1,2 ...]
# Runs the repository's .venv (made by `make install` or `make demo`), else `prodclip` on the PATH,
# else `python3 -m prodclip.cli` (set PRODCLIP=... to choose another).
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n "${PRODCLIP:-}" ]]; then
  read -r -a RUN <<< "$PRODCLIP"
elif [[ -x "$REPO_DIR/.venv/bin/prodclip" ]]; then
  RUN=("$REPO_DIR/.venv/bin/prodclip")
elif command -v prodclip > /dev/null; then
  RUN=(prodclip)
else
  RUN=(python3 -m prodclip.cli)
fi
exec "${RUN[@]}" train --config "$CONFIG" --workdir "$WORKDIR" "$@"
