#!/usr/bin/env bash
# Create .venv and install recap with its dev tools and Airflow (the dags extra). torch goes
# first, pinned, so that pip does not pick another multi-GB build for open_clip/transnetv2 later
# (override with RECAP_TORCH="torch==X torchvision==Y").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet ${RECAP_TORCH:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install --quiet -e ".[dev,dags]"
echo "recap installed in .venv ($(.venv/bin/recap --help >/dev/null && echo ok))"
