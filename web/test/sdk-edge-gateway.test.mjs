// The SDK against real processes with JWT auth (nats-server, simulator, worker and a gateway,
// started by helpers/run_stack.py): tokens that expire every 2-3 s during a ~9 s answer, an
// idle close that must not reconnect by itself, and a chat over hello's frame limit.

import assert from 'node:assert/strict';
import { createHmac, randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import { Connection } from '../sdk/tokenwire.js';
import { NodeWebSocket } from './helpers/nodews.mjs';
import { expectedAnswer, sleep, startStack, waitFor } from './helpers/stack.mjs';

const SECRET = `sdk-edge-secret-${randomUUID()}`; // over the 32-byte minimum
const IDLE_TIMEOUT_S = 2;

let stack;
const connections = [];

/** NodeWebSocket that remembers every frame the SDK sent, across all sockets. */
const sent = [];
class RecordingWebSocket extends NodeWebSocket {
  send(data) {
    sent.push(JSON.parse(data));
    super.send(data);
  }
}

const b64url = (value) => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

/** A token provider: a fresh HS256 JWT per call, valid `ttlS` (whole seconds), counting calls. */
function tokens(sub, ttlS) {
  const provider = async () => {
    provider.issued += 1;
    const body = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url({ sub, exp: Math.floor(Date.now() / 1000 + ttlS) })}`;
    return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
  };
  provider.issued = 0;
  provider.sub = sub;
  return provider;
}

function connect(token) {
  const conn = new Connection({
    url: stack.wsUrl,
    token,
    WebSocket: RecordingWebSocket,
    storage: null,
    backoff: { initialMs: 50, maxMs: 500, factor: 2, jitter: 0.5 },
  });
  connections.push(conn);
  return conn;
}

function assertGapless(request) {
  const seqs = request.frames.map((f) => f.seq);
  assert.deepEqual(seqs, seqs.map((_, i) => i + 1), `seqs not 1..n once each: ${seqs}`);
}

describe('SDK over a real JWT gateway', { timeout: 180000 }, () => {
  before(async () => {
    stack = await startStack({
      gatewayEnv: {
        TOKENWIRE_AUTH: 'jwt',
        TOKENWIRE_ALLOW_INSECURE: '0',
        TOKENWIRE_JWT_SECRET: SECRET,
        TOKENWIRE_IDLE_TIMEOUT_S: String(IDLE_TIMEOUT_S),
      },
    });
  });

  after(async () => {
    for (const conn of connections) conn.close();
    await stack?.stop();
  });

  test('an answer outlives many short-lived tokens: refresh, reconnect, resume, exact', async () => {
    const token = tokens(`sdk-jwt-${randomUUID().slice(0, 6)}`, 3);
    const conn = connect(token);
    const closes = [];
    conn.on('state', (s) => s.code && closes.push(s.code));
    await conn.connect();
    assert.equal(conn.hello.user, token.sub);
    const twSim = { delay_ms: 100, tokens: 90 };
    const query = 'SDK outlives the tokens';
    const request = conn.chat(query, { inputs: { tw_sim: twSim } });
    await request.done;
    assert.equal(request.status, 'done', request.error?.message);
    assert.equal(request.text, expectedAnswer(query, twSim));
    assertGapless(request);
    assert.ok(closes.filter((c) => c === 4002).length >= 2, `closes: ${closes}`);
    assert.ok(token.issued >= 3, `tokens issued: ${token.issued}`);
    assert.equal((await stack.simQueries()).filter((q) => q === query).length, 1, 'Dify was asked once');
    conn.close();
  });

  test('an idle close (4103) does not reconnect until the application sends something', async () => {
    const token = tokens(`sdk-idle-${randomUUID().slice(0, 6)}`, 600);
    const conn = connect(token);
    const states = [];
    conn.on('state', (s) => states.push(s.state));
    await conn.connect();
    await waitFor(() => conn.state === 'idle', { timeoutMs: (IDLE_TIMEOUT_S + 10) * 1000, what: 'the idle close' });
    assert.equal(conn.lastClose.code, 4103);
    // Longer than the idle timeout plus every backoff: a reconnect would have happened by now.
    await sleep((IDLE_TIMEOUT_S + 1) * 1000);
    assert.equal(conn.state, 'idle');
    assert.equal(token.issued, 1, 'no reconnect by itself');
    assert.ok(!states.includes('reconnecting'), `states: ${states}`);

    const request = conn.chat('SDK back after a break');
    await request.done;
    assert.equal(request.status, 'done', request.error?.message);
    assert.equal(request.text, expectedAnswer('SDK back after a break'));
    assert.equal(token.issued, 2, 'the chat reconnected once');
    conn.close();
  });

  test('an oversize chat fails once with frame_too_large and is never sent', async () => {
    const conn = connect(tokens(`sdk-big-${randomUUID().slice(0, 6)}`, 600));
    await conn.connect();
    const limit = conn.hello.limits.max_frame_bytes;
    assert.equal(limit, 64 * 1024, 'the gateway announces TOKENWIRE_MAX_FRAME_BYTES');
    const query = `SDK too big ${'x'.repeat(limit)}`;
    const big = conn.chat(query, { id: `sdk-big-${randomUUID()}` });
    assert.equal(big.status, 'error');
    assert.equal(big.error.code, 'frame_too_large');
    assert.equal(big.error.retryable, false);

    const twSim = { delay_ms: 30 };
    const small = conn.chat('SDK small after big', { inputs: { tw_sim: twSim } });
    await waitFor(() => small.frames.filter((f) => f.type === 'delta').length >= 2, { what: 'some answer' });
    conn.dropForTesting(); // the reconnect re-sends what is unfinished: not the big one
    await small.done;
    assert.equal(small.text, expectedAnswer('SDK small after big', twSim));
    assert.ok(!sent.some((f) => f.id === big.id), 'the oversize chat never reached a socket');
    assert.deepEqual(sent.filter((f) => f.id === small.id).map((f) => f.type), ['chat', 'resume']);
    assert.ok(!(await stack.simQueries()).includes(query));
    conn.close();
  });
});
