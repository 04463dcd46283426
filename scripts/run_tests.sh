#!/usr/bin/env bash
# The test command: creates both environments when missing (or when the
# requirement files changed), then runs the whole suite:
#   - server environment: the shared package (tests/ttsrl, less its trainer-side subpackages) and tests/server
#   - trainer environment: everything else in tests/ (it starts reward servers
#     in the server environment where a test needs one)
# It also installs Debian's espeak-ng when missing (real speech for the quality reward's test;
# apt-get, through sudo when not root).
# Extra arguments go to both pytest runs, e.g. bash scripts/run_tests.sh -x -k scoring
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v espeak-ng >/dev/null; then
  echo "run_tests.sh: installing espeak-ng (apt-get)"
  sudo_=()
  [ "$(id -u)" = 0 ] || sudo_=(sudo)
  "${sudo_[@]}" apt-get update -qq && "${sudo_[@]}" apt-get install -y -qq espeak-ng >/dev/null \
    || { echo "run_tests.sh: could not install espeak-ng: apt-get install -y espeak-ng" >&2; exit 1; }
fi

bash scripts/setup_env.sh trainer
bash scripts/setup_env.sh server

status=0
run_pytest() {
  # pytest exits 5 when a selection collects no test; with -k that is expected for one of the two runs
  local code=0
  "$@" || code=$?
  if [ $code -eq 5 ]; then
    echo "run_tests.sh: no test selected in: $*"
  elif [ $code -ne 0 ]; then
    status=$code
  fi
}

echo "== server environment (.venv-server) =="
# tests/ttsrl/{policy,training,evaluation} test trainer-side subpackages (veRL, pyarrow): trainer env only
run_pytest .venv-server/bin/python -m pytest -p no:cacheprovider tests/ttsrl tests/server \
  --ignore=tests/ttsrl/policy --ignore=tests/ttsrl/training --ignore=tests/ttsrl/evaluation "$@"
echo "== trainer environment (.venv) =="
run_pytest .venv/bin/python -m pytest -p no:cacheprovider tests --ignore=tests/server "$@"
exit $status
