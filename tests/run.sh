#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a machine with only Python 3.11 and Node.js:
# installs what the tests need (the venv, Debian's chromium and nginx, the web tools), runs the
# linters and type checker, then the Python suites and the browser/Node suite side by side.
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

py=$(command -v python3.11 || command -v python3)
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench,otel]'

# Debian packages: a browser for the browser tests, nginx for the TLS proxy test.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Node tools the Python tests use offline (the AsyncAPI 3 schema), and the web tools (the
# install tests drive the page with playwright-core too, so web/ is installed once, here).
npm ci --prefix deploy --no-audit --no-fund --loglevel=error >/dev/null
npm ci --prefix web --no-audit --no-fund --loglevel=error >/dev/null
export TOKENWIRE_WEB_DEPS_READY=1

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict (gateway, worker, shared, tokenwire)"
.venv/bin/mypy

mkdir -p test-artifacts
status=0

# The web suite (SDK unit tests, SDK over a real gateway, browser tests) runs beside pytest.
web_log=test-artifacts/web-tests.log
if [ -f web/test/run.sh ]; then
  bash web/test/run.sh >"$web_log" 2>&1 &
  web_pid=$!
else
  web_pid=""
fi

# tests/install/ installs tokenwire the ways users do (the README's command, a wheel, the
# Dockerfile's recipe) into fresh venvs and runs it from there; pip's cache keeps that fast.
echo "== pytest (unit, integration, install, deploy, bench)"
.venv/bin/python -m pytest -n 2 --dist loadscope -p no:cacheprovider tests || status=$?

if [ -n "$web_pid" ]; then
  web_status=0
  wait "$web_pid" || web_status=$?
  echo "== web and browser tests"
  cat "$web_log"
  if [ "$web_status" -ne 0 ]; then status=$web_status; fi
fi

cd "$root"
exit "$status"
