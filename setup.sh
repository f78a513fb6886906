#!/usr/bin/env bash
# One-command, idempotent environment setup: creates .venv with the pinned stack.
#   bash setup.sh          # user environment
#   bash setup.sh --test   # + test tools (moto S3 server, playwright), the single-node SLURM packages
#                          #   and Debian's Chromium (root only)
# The mmcv compile (~12 min on 2 cores) happens once: the wheel is kept in
# $IBOT_WHEEL_CACHE (default ~/.cache/ibot-repro/wheels), keyed by the torch version.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.9.1
TORCHVISION_VERSION=0.24.1
MMCV_VERSION=2.1.0
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
WHEELS=${IBOT_WHEEL_CACHE:-$HOME/.cache/ibot-repro/wheels}/torch-$TORCH_VERSION-$(uname -m)
WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

have() { "$PY" - "$1" "$2" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version(sys.argv[1]).split('+')[0] == sys.argv[2] else 1)
PYEOF
}

# PyPI's x86_64 torch is the CUDA build (~3.8 GB of wheels, ~6.6 GB installed). One pip call holds every
# wheel until the end; installing the CUDA wheels one at a time lowers the disk peak of `bash setup.sh` on a
# fresh clone from 10.5 to 8.1 GB above the start (2 cores, 2026-12-07), for ~40 s more.
NEED_GB=9
if ! have torch "$TORCH_VERSION" || ! have torchvision "$TORCHVISION_VERSION"; then
  avail_gb=$(( $(df -Pk "$VENV" | awk 'NR==2 {print $4}') / 1024 / 1024 ))
  if (( avail_gb < NEED_GB )); then
    echo "setup.sh: $(realpath "$VENV") has ${avail_gb} GB free; torch $TORCH_VERSION needs about $NEED_GB GB" \
         "(the venv ends near 8.5 GB). Free space there or set VENV=<dir on a larger disk>." >&2
    exit 1
  fi
  step "installing torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION (large download, ~2 min)"
  "${PIP[@]}" install --progress-bar on "pip>=24" "setuptools<70" wheel ninja
  report=$(mktemp)
  "${PIP[@]}" install --quiet --dry-run --report "$report" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  # the large wheels first, each downloaded, installed and dropped before the next
  mapfile -t large < <("$PY" - "$report" <<'PYEOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if name.startswith("nvidia-") or name == "triton":
        print(f"{name}=={version}")
PYEOF
)
  for req in "${large[@]}"; do "${PIP[@]}" install --no-cache-dir --no-deps --progress-bar on "$req"; done
  rm -f "$report"
  "${PIP[@]}" install --no-cache-dir --progress-bar on "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

if ! have mmcv "$MMCV_VERSION" || ! "$PY" -c "import mmcv.ops" 2>/dev/null; then
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
    step "compiling mmcv $MMCV_VERSION with ops (once; ~12 min on 2 cores) into $WHEELS"
    "${PIP[@]}" install "setuptools<70" wheel ninja "numpy==2.4.6"
    log="$WHEELS/mmcv-build.log"
    started=$SECONDS
    ( while sleep 60; do echo "    ... still compiling mmcv ($(( (SECONDS - started) / 60 )) min; log: $log)"; done ) &
    ticker=$!
    trap 'kill $ticker 2>/dev/null' EXIT
    if ! MMCV_WITH_OPS=1 MAX_JOBS=$(nproc) FORCE_CUDA=0 \
        "${PIP[@]}" wheel -v --no-build-isolation --no-deps "mmcv==$MMCV_VERSION" -w "$WHEELS" >"$log" 2>&1; then
      tail -n 40 "$log"; echo "mmcv build failed; full log: $log" >&2; exit 1
    fi
    kill $ticker 2>/dev/null; trap - EXIT
  fi
  step "installing cached mmcv wheel"
  "${PIP[@]}" install --no-deps "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl
fi

step "installing the project and its pinned dependencies"
if [[ $WITH_TEST == 1 ]]; then EXTRA=".[test,dalle]"; else EXTRA="."; fi  # tests: also the DALL-E tokenizer (Tab. 9/20)
"${PIP[@]}" install --progress-bar on -e "$EXTRA"
"$PY" -c "import torch, mmcv.ops, mmdet, mmseg, timm; print('environment ok: torch', torch.__version__, '| mmcv', mmcv.__version__, '| timm', timm.__version__)"

if [[ $WITH_TEST == 1 && $(id -u) == 0 ]] && ! command -v slurmctld >/dev/null; then
  step "installing single-node SLURM + munge for the cluster tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
    || echo "warning: could not install slurm-wlm; SLURM tests will be skipped"
fi
if [[ $WITH_TEST == 1 && $(id -u) == 0 ]] && ! command -v chromium >/dev/null; then
  step "installing Debian's Chromium for the report browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the report browser test will be skipped"
fi
step "setup done"
