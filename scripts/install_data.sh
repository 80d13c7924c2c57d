#!/usr/bin/env bash
# Fashion-MNIST comes from Debian's package `dataset-fashion-mnist`
# (files in /usr/share/datasets/fashion-mnist). Needs root for apt-get.
set -u
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "tangentlab: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/tmp/tangentlab-apt.log 2>&1; then
    exit 0
  fi
  echo "tangentlab: apt-get failed (log: /tmp/tangentlab-apt.log)."
fi
cat >&2 <<'MSG'
tangentlab: Fashion-MNIST is not installed and could not be installed here (needs root
and Debian's apt). Install it with
    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist
or point TANGENTLAB_FASHION_MNIST at a folder holding the four *-idx*-ubyte.gz files.
Until then the fashion-lite0 example falls back to scikit-learn's digits images
(PyPI-only), and says so when it runs.
MSG
exit 1
