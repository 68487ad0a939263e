// Test helpers that run the real thing: `tokenwire dev`, a cuttable TCP proxy in front of
// it, and the simulator's expected answers (computed by the Python package itself).

import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const WEB_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const REPO_DIR = resolve(WEB_DIR, '..');
export const ARTIFACTS_DIR = join(REPO_DIR, 'test-artifacts');

/** The project's Python: TOKENWIRE_PYTHON, else the repo's .venv. */
export function python() {
  const candidate = process.env.TOKENWIRE_PYTHON ?? join(REPO_DIR, '.venv', 'bin', 'python');
  if (!existsSync(candidate)) {
    throw new Error(`no Python at ${candidate}: create the repo's .venv (or set TOKENWIRE_PYTHON)`);
  }
  return candidate;
}

/** What the simulator answers to `query` (with `tw_sim` controls), as the Python package says. */
export function expectedAnswer(query, twSim = {}) {
  const code = [
    'import json, sys',
    'from tokenwire.simulator import expected_final_answer',
    'print(json.dumps(expected_final_answer(sys.argv[1], json.loads(sys.argv[2]))))',
  ].join('\n');
  const out = execFileSync(python(), ['-c', code, query, JSON.stringify(twSim)], {
    cwd: REPO_DIR,
    encoding: 'utf8',
  });
  return JSON.parse(out);
}

export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Poll `check` until it returns a truthy value (returned), or fail after `timeoutMs`. */
export async function waitFor(check, { timeoutMs = 20000, intervalMs = 20, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

const live = new Set();
function killAll() {
  for (const child of live) {
    try {
      child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
}
process.on('exit', killAll);
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(signal, () => {
    killAll();
    process.exit(128 + 2);
  });
}

/**
 * Start `tokenwire dev` on a free port in a fresh temp folder, with no DIFY_API_KEY (so the
 * bundled simulator answers). Resolves once it prints "tokenwire is ready: <url>".
 */
export async function startDev({ extraOrigins = [], timeoutMs = 90000 } = {}) {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'tw-web-'));
  const env = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (key.startsWith('DIFY_') || key.startsWith('TOKENWIRE_')) continue;
    env[key] = value;
  }
  env.PYTHONUNBUFFERED = '1';
  env.NO_COLOR = '1';
  if (extraOrigins.length) {
    const own = [`http://127.0.0.1:${port}`, `http://localhost:${port}`];
    env.TOKENWIRE_ALLOWED_ORIGINS = [...own, ...extraOrigins].join(',');
  }
  const child = spawn(
    python(),
    ['-m', 'tokenwire', 'dev', '--host', '127.0.0.1', '--port', String(port), '--data-dir', join(dir, 'data')],
    { cwd: dir, env, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  live.add(child);
  let log = '';
  const onData = (chunk) => {
    log += chunk.toString();
  };
  child.stdout.on('data', onData);
  child.stderr.on('data', onData);
  const exited = new Promise((r) => child.once('exit', (code, signal) => r({ code, signal })));

  const url = await new Promise((resolveUrl, reject) => {
    const timer = setTimeout(() => {
      reject(new Error(`tokenwire dev not ready after ${timeoutMs} ms:\n${log.slice(-4000)}`));
    }, timeoutMs);
    const check = () => {
      const match = /tokenwire is ready: (http:\/\/\S+)/.exec(log);
      if (match) {
        clearTimeout(timer);
        resolveUrl(match[1]);
      }
    };
    child.stdout.on('data', check);
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`tokenwire dev exited (${code ?? signal}) before it was ready:\n${log.slice(-4000)}`));
    });
  });

  return {
    url,
    port,
    wsUrl: `ws://127.0.0.1:${port}/v1/ws`,
    dir,
    log: () => log,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGINT');
        const timer = setTimeout(() => child.kill('SIGKILL'), 20000);
        await exited;
        clearTimeout(timer);
      }
      live.delete(child);
      try {
        writeFileSync(join(dir, 'dev.log'), log);
        if (!process.env.TOKENWIRE_KEEP_TMP) rmSync(dir, { recursive: true, force: true });
      } catch {
        // best effort
      }
    },
  };
}

/**
 * A TCP proxy to 127.0.0.1:targetPort (a number, or a function giving it) whose connections a test can cut, as a network failure
 * would (TCP reset, no WebSocket close frame), and which can refuse new connections a while.
 */
export async function startProxy(targetPort) {
  const target = typeof targetPort === 'function' ? targetPort : () => targetPort;
  const pairs = new Set();
  let refuseUntil = 0;
  const server = net.createServer((client) => {
    if (Date.now() < refuseUntil) {
      client.resetAndDestroy?.() ?? client.destroy();
      return;
    }
    const upstream = net.connect(target(), '127.0.0.1');
    const pair = { client, upstream };
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end);
    upstream.on('error', end);
    client.on('close', end);
    upstream.on('close', end);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  return {
    port,
    url: `http://127.0.0.1:${port}/`,
    origin: `http://127.0.0.1:${port}`,
    get connections() {
      return pairs.size;
    },
    /** Reset every open connection; refuse new ones for `refuseMs`. Returns how many were cut. */
    cut({ refuseMs = 0 } = {}) {
      refuseUntil = Date.now() + refuseMs;
      const count = pairs.size;
      for (const { client, upstream } of [...pairs]) {
        if (client.resetAndDestroy) client.resetAndDestroy();
        else client.destroy();
        upstream.destroy();
      }
      pairs.clear();
      return count;
    },
    close() {
      this.cut();
      return new Promise((r) => server.close(() => r()));
    },
  };
}

/**
 * A stack of separate processes (nats-server, simulator, worker, one gateway with `gatewayEnv`)
 * for settings `tokenwire dev` does not take (e.g. TOKENWIRE_AUTH=jwt): helpers/run_stack.py
 * starts it with the Python integration tests' own stack. Resolves once the gateway is ready.
 */
export async function startStack({ gatewayEnv = {}, timeoutMs = 90000 } = {}) {
  const env = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (key.startsWith('DIFY_') || key.startsWith('TOKENWIRE_')) continue;
    env[key] = value;
  }
  env.PYTHONUNBUFFERED = '1';
  const script = join(WEB_DIR, 'test', 'helpers', 'run_stack.py');
  const child = spawn(python(), [script, JSON.stringify(gatewayEnv)], {
    cwd: REPO_DIR,
    env,
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  live.add(child);
  let out = '';
  let log = '';
  child.stderr.on('data', (chunk) => {
    log += chunk.toString();
  });
  const exited = new Promise((r) => child.once('exit', (code, signal) => r({ code, signal })));
  const ready = await new Promise((resolveReady, reject) => {
    const timer = setTimeout(() => reject(new Error(`stack not ready after ${timeoutMs} ms:\n${log.slice(-4000)}`)), timeoutMs);
    child.stdout.on('data', (chunk) => {
      out += chunk.toString();
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (line) {
        clearTimeout(timer);
        resolveReady(JSON.parse(line));
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`the stack exited (${code ?? signal}) before it was ready:\n${out}${log.slice(-4000)}`));
    });
  });
  return {
    wsUrl: ready.ws_url,
    simUrl: ready.sim_url,
    log: () => out + log,
    /** The queries the simulator (Dify) was asked, oldest first. */
    async simQueries() {
      const response = await fetch(`${ready.sim_url.replace(/\/v1$/, '')}/_sim/requests`);
      return (await response.json()).map((r) => r.query);
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.stdin.end();
        const timer = setTimeout(() => child.kill('SIGKILL'), 30000);
        await exited;
        clearTimeout(timer);
      }
      live.delete(child);
    },
  };
}
