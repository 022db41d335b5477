#!/usr/bin/env bash
# Single-machine launch:  ./launch_mono.sh RUN_CFG [hydra overrides...] [--skip-memcheck]
#   ./launch_mono.sh teacher_rlt_mono_85gb.yaml max_steps=300
#   ./launch_mono.sh cfgs/run_cfg/tiny_sft.yaml learning_rate=1e-3
# RUN_CFG may be `name`, `name.yaml` or `cfgs/run_cfg/name.yaml`. Overrides are passed to Hydra untouched; the
# trainer checks the config and the GPU memory estimate before loading weights (--skip-memcheck = memcheck=false).
# This script holds no config values and never edits files. Uses .venv/bin/python if present, else `python`.
set -euo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
run_cfg="$(basename "$1")"; run_cfg="${run_cfg%.yaml}"; shift
if [[ ! -f "$here/cfgs/run_cfg/$run_cfg.yaml" ]]; then
  echo "launch_mono.sh: no run config '$run_cfg' in $here/cfgs/run_cfg/; available:" >&2
  ls "$here/cfgs/run_cfg" | sed 's/\.yaml$//; s/^/  /' >&2
  exit 2
fi
args=()
for a in "$@"; do
  if [[ $a == --skip-memcheck ]]; then args+=("memcheck=false"); else args+=("$a"); fi
done
python="${PYTHON:-$here/.venv/bin/python}"
[[ -x "$python" ]] || python=python
exec "$python" -m rlt.train "run_cfg=$run_cfg" ${args[@]+"${args[@]}"}
