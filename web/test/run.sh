#!/usr/bin/env bash
# The web/ test suite: SDK unit tests (fake WebSocket), the Markdown renderer, the SDK over a
# real `tokenwire dev`, and the web page in Debian's Chromium (playwright-core; never a
# downloaded browser). Needs the repo's .venv with tokenwire installed (or TOKENWIRE_PYTHON).
# Installs what is missing: Node.js/npm and Chromium with apt-get, the npm devDependencies
# with `npm ci`. Screenshots land in <repo>/test-artifacts/. Exits non-zero on any failure.
set -euo pipefail

WEB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_DIR="$(cd "$WEB_DIR/.." && pwd)"
CHROMIUM="${TOKENWIRE_CHROMIUM:-/usr/bin/chromium}"

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
fi
apt_updated=0
apt_install() {
  echo "web tests: installing $* with apt-get" >&2
  if [ "$apt_updated" -eq 0 ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "web tests need Node.js >= 20 (playwright-core does); found $(node --version)" >&2
  exit 1
fi
if [ ! -x "$CHROMIUM" ]; then
  apt_install chromium
fi
if [ -z "${TOKENWIRE_PYTHON:-}" ] && [ ! -x "$REPO_DIR/.venv/bin/python" ]; then
  echo "web tests need the repo's .venv (python -m venv .venv && .venv/bin/pip install -e .)" >&2
  exit 1
fi

cd "$WEB_DIR"
if [ -n "${TOKENWIRE_WEB_DEPS_READY:-}" ] && [ -d node_modules/playwright-core ]; then
  # tests/run.sh installed them already (and other suites use them right now).
  :
elif [ -f package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
else
  npm install --no-audit --no-fund --loglevel=error
fi

echo "web tests: type-checking the SDK's .d.ts (tsc --noEmit)" >&2
npx --no-install tsc --noEmit -p .

mkdir -p "$REPO_DIR/test-artifacts"
echo "web tests: node --test (unit, SDK over tokenwire dev, Chromium)" >&2
# One file at a time: the gateway and browser suites each start a whole `tokenwire dev`.
node --test --test-concurrency=1 --test-reporter=spec \
  test/*.test.mjs test/browser/*.test.mjs
