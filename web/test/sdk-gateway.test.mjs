// The SDK against a real `tokenwire dev` (NATS, worker, gateway, Dify simulator): answers,
// a forced disconnect mid-answer with reconnect and resume, and stop.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Connection } from '../sdk/tokenwire.js';
import { MemoryStorage } from './helpers/fakews.mjs';
import { NodeWebSocket } from './helpers/nodews.mjs';
import { expectedAnswer, startDev, waitFor } from './helpers/stack.mjs';

let dev;
const sockets = [];
const connections = [];

/** NodeWebSocket, remembering each socket and every frame the SDK sent on it. */
class RecordingWebSocket extends NodeWebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    this.sentFrames = [];
    sockets.push(this);
  }

  send(data) {
    this.sentFrames.push(JSON.parse(data));
    super.send(data);
  }
}

function connect(user, options = {}) {
  const conn = new Connection({
    url: dev.wsUrl,
    user,
    WebSocket: RecordingWebSocket,
    storage: null,
    backoff: { initialMs: 100, maxMs: 1000, factor: 2, jitter: 0.5 },
    ...options,
  });
  connections.push(conn);
  return conn;
}

function assertGapless(request) {
  const seqs = request.frames.map((f) => f.seq);
  assert.deepEqual(seqs, seqs.map((_, i) => i + 1), `seqs not 1..n once each: ${seqs}`);
}

const deltas = (request) => request.frames.filter((f) => f.type === 'delta').length;

describe('SDK over a real gateway', { timeout: 150000 }, () => {
  before(async () => {
    dev = await startDev();
  });

  after(async () => {
    for (const conn of connections) conn.close();
    await dev?.stop();
  });

  test('an answer streams in and equals the simulator answer', async () => {
    const conn = connect('sdk-plain');
    await conn.connect();
    assert.equal(conn.hello.user, 'sdk-plain');
    const query = 'What does the SDK do?';
    const request = conn.chat(query);
    const texts = [];
    request.on('text', (t) => texts.push(t));
    await request.done;
    assert.equal(request.status, 'done', request.error?.message);
    assert.equal(request.text, expectedAnswer(query));
    assert.ok(texts.length >= 10, `streamed in ${texts.length} steps`);
    assert.match(request.conversationId, /^[0-9a-f-]{36}$/);
    assertGapless(request);

    // The next turn continues the conversation.
    const second = conn.chat('And then?', { conversationId: request.conversationId });
    await second.done;
    assert.equal(second.conversationId, request.conversationId);
    assert.equal(second.text, expectedAnswer('And then?'));
    conn.close();
  });

  test('a forced disconnect mid-answer: reconnect, resume, exactly the answer', async () => {
    const conn = connect('sdk-drop');
    await conn.connect();
    const twSim = { delay_ms: 40, tokens: 60 };
    const query = 'Tell me about resume';
    const expected = expectedAnswer(query, twSim);
    const request = conn.chat(query, { inputs: { tw_sim: twSim } });
    const states = [];
    conn.on('state', (s) => states.push(s.state));

    await waitFor(() => deltas(request) >= 5, { what: 'some answer text' });
    const held = request.lastSeq;
    const before = sockets.length;
    sockets.at(-1).terminate(); // a TCP reset: no close frame, as a network failure

    await waitFor(() => sockets.length > before && conn.state === 'open', { what: 'a new open socket' });
    const resumes = sockets.at(-1).sentFrames.filter((f) => f.type === 'resume');
    assert.equal(resumes.length, 1);
    assert.equal(resumes[0].id, request.id);
    assert.ok(resumes[0].after >= held, `resumed after ${resumes[0].after}, held ${held}`);

    await request.done;
    assert.equal(request.status, 'done', request.error?.message);
    assert.ok(request.text.length > 0 && request.text.length < 2 * expected.length);
    assert.equal(request.text, expected);
    assertGapless(request);
    assert.ok(states.includes('reconnecting'), `states: ${states}`);

    // Dropped twice in a row, the second time before the first resume is answered.
    const second = conn.chat('Again, twice', { inputs: { tw_sim: twSim } });
    await waitFor(() => deltas(second) >= 3, { what: 'text of the second answer' });
    conn.dropForTesting();
    await waitFor(() => conn.state === 'open', { what: 'reconnect 1' });
    conn.dropForTesting();
    await second.done;
    assert.equal(second.text, expectedAnswer('Again, twice', twSim));
    assertGapless(second);
    conn.close();
  });

  test('a chat whose socket drops before it is acknowledged is answered once', async () => {
    const conn = connect('sdk-early-drop');
    await conn.connect();
    const query = 'Dropped at once';
    const request = conn.chat(query);
    conn.dropForTesting(); // the chat may or may not have reached the gateway
    await request.done;
    assert.equal(request.status, 'done', request.error?.message);
    assert.equal(request.text, expectedAnswer(query));
    assertGapless(request);
    conn.close();
  });

  test('stop mid-answer ends the request as stopped with a prefix of the answer', async () => {
    const conn = connect('sdk-stop');
    await conn.connect();
    const twSim = { delay_ms: 50, tokens: 80 };
    const query = 'Stop me';
    const request = conn.chat(query, { inputs: { tw_sim: twSim } });
    await waitFor(() => deltas(request) >= 3, { what: 'some answer text' });
    request.stop();
    await request.done;
    assert.equal(request.status, 'stopped');
    assert.equal(request.end.stopped, true);
    const full = expectedAnswer(query, twSim);
    assert.ok(request.text.length < full.length, 'stopped before the end');
    assert.ok(full.startsWith(request.text), 'what came is the start of the answer');
    conn.close();
  });

  test('resume of an unknown request fails it instead of hanging', async () => {
    // What a page reload finds in sessionStorage for a request the gateway never had.
    const storage = new MemoryStorage();
    const snapshot = { id: 'never-asked-1', query: 'q', lastSeq: 3, text: 'abc', status: 'answering' };
    const probe = connect('sdk-unknown', { storage, autoConnect: false });
    storage.setItem(probe._storageKey, JSON.stringify([snapshot]));
    const conn = connect('sdk-unknown', { storage });
    const [request] = conn.restored;
    assert.equal(request.id, 'never-asked-1');
    await request.done;
    assert.equal(request.status, 'error');
    assert.equal(request.error.code, 'unknown_request');
    assert.equal(request.text, 'abc');
    conn.close();
  });
});
