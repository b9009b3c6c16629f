#!/usr/bin/env bash
# Install everything the tests need into ./.venv (CPU torch first), then run the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test,bench]'

# Debian packages the tests drive: a real Prometheus for the metrics tests, the native load
# generators wrk and h2load (nghttp2-client) for the load-generator tests
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) || echo "warning: could not install ${missing[*]}; their tests will be skipped"
fi

python -m pytest -q "$@"
