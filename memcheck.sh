#!/usr/bin/env bash
# Will this run fit on the GPU?  ./memcheck.sh RUN_CFG [hydra overrides...] [--gpu-memory 85GB] [--json]
# Exit status: 0 PASS, 1 FAIL, 2 usage/config error. See `python -m rlt.memcheck --help` and docs/memory.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[[ -x "$python" ]] || python=python
cd "$here"
exec "$python" -m rlt.memcheck "$@"
