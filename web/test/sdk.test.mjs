// SDK unit tests: the test plays the gateway through an in-process fake WebSocket.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { CLOSE_CODES } from '../sdk/close-codes.js';
import { MAX_REFRESH_TRIES, backoffDelay, closePolicy, defaultUrl, hintDelay } from '../sdk/tokenwire.js';
import { connection, opened } from './helpers/fakeconn.mjs';
import { FakeWebSocket, MemoryStorage, answerFrames } from './helpers/fakews.mjs';
import { sleep, waitFor } from './helpers/stack.mjs';

const TOKENS = ['Hello', ' wor', 'ld', ' — ', '你好', ' 👋🏽', '.'];
const ANSWER = TOKENS.join('');

describe('one answer', () => {
  test('frames build the running text, the status and the end', async () => {
    const conn = connection();
    const ws = await opened(conn);
    assert.equal(ws.url, 'ws://gw.test/v1/ws?user=u1');
    assert.deepEqual(ws.protocols, ['tokenwire.v1']);
    const request = conn.chat('hi there', { id: 'r1', inputs: { a: 1 } });
    assert.deepEqual(ws.sent, [{ type: 'chat', id: 'r1', query: 'hi there', inputs: { a: 1 } }]);
    const texts = [];
    request.on('text', (t) => texts.push(t));
    for (const frame of answerFrames('r1', TOKENS)) ws.emit(frame);
    const done = await request.done;
    assert.equal(done, request);
    assert.equal(request.text, ANSWER);
    assert.equal(request.status, 'done');
    assert.equal(request.conversationId, 'c-1');
    assert.equal(request.end.type, 'end');
    assert.equal(texts.at(-1), ANSWER);
    assert.equal(texts.length, TOKENS.length);
    assert.equal(conn.requests.size, 0, 'a finished request is forgotten');
  });

  test('async iteration yields every frame once, in order, then ends', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const request = conn.chat('q', { id: 'r1' });
    const frames = answerFrames('r1', TOKENS);
    setTimeout(() => {
      for (const f of frames.slice(0, 3)) ws.emit(f);
      setTimeout(() => frames.slice(3).forEach((f) => ws.emit(f)), 5);
    }, 5);
    const seen = [];
    for await (const frame of request) seen.push(frame.seq);
    assert.deepEqual(seen, frames.map((f) => f.seq));
  });

  test('replace and reset are applied', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const request = conn.chat('q', { id: 'r1' });
    const frames = [
      { type: 'accepted' },
      { type: 'delta', text: 'bad ' },
      { type: 'delta', text: 'words' },
      { type: 'replace', text: 'Moderated.' },
      { type: 'delta', text: ' More.' },
      { type: 'reset', reason: 'worker_lost' },
      { type: 'delta', text: 'Fresh ' },
      { type: 'delta', text: 'answer.' },
      { type: 'end', conversation_id: 'c', message_id: 'm', usage: null, retriever_resources: [], stopped: false },
    ];
    const texts = [];
    request.on('text', (t) => texts.push(t));
    frames.forEach((f, i) => ws.emit({ ...f, id: 'r1', seq: i + 1 }));
    await request.done;
    assert.equal(request.text, 'Fresh answer.');
    assert.deepEqual(texts, ['bad ', 'bad words', 'Moderated.', 'Moderated. More.', '', 'Fresh ', 'Fresh answer.']);
  });

  test('frames already applied are dropped (what a replay after resume delivers)', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const request = conn.chat('q', { id: 'r1' });
    const frames = answerFrames('r1', TOKENS);
    for (const f of frames.slice(0, 5)) ws.emit(f);
    for (const f of frames) ws.emit(f); // replayed from seq 1
    await request.done;
    assert.equal(request.text, ANSWER);
    assert.deepEqual(request.frames.map((f) => f.seq), frames.map((f) => f.seq));
  });

  test('an error frame with seq closes the request; one without id is a connection error', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const errors = [];
    conn.on('error', (e) => errors.push(e.code));
    const request = conn.chat('q', { id: 'r1' });
    ws.emit({ type: 'error', code: 'bad_json', message: 'frame is not valid JSON', retryable: false });
    assert.deepEqual(errors, ['bad_json']);
    assert.equal(request.finished, false);
    ws.emit({ type: 'accepted', id: 'r1', seq: 1 });
    ws.emit({ type: 'error', id: 'r1', seq: 2, code: 'upstream_error', message: 'boom', retryable: false });
    await request.done;
    assert.equal(request.status, 'error');
    assert.equal(request.error.code, 'upstream_error');
    assert.equal(conn.requests.size, 0);
  });

  test('queued frames show in the status', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const request = conn.chat('q', { id: 'r1' });
    const statuses = [];
    request.on('status', (s) => statuses.push(s));
    ws.emit({ type: 'accepted', id: 'r1', seq: 1 });
    ws.emit({ type: 'queued', id: 'r1', seq: 2, reason: 'dify_rate_limited', attempt: 2, retry_in_ms: 4000 });
    assert.equal(request.status, 'queued');
    assert.deepEqual(request.queued, { reason: 'dify_rate_limited', attempt: 2, retryInMs: 4000, position: null });
    ws.emit({ type: 'start', id: 'r1', seq: 3, conversation_id: 'c', message_id: 'm', task_id: 't' });
    assert.equal(request.queued, null);
    assert.deepEqual(statuses, ['accepted', 'queued', 'answering']);
  });

  test('stop sends a stop frame; the stopped end closes the request', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const request = conn.chat('q', { id: 'r1' });
    const frames = answerFrames('r1', TOKENS);
    for (const f of frames.slice(0, 4)) ws.emit(f);
    request.stop();
    assert.deepEqual(ws.sentOfType('stop'), [{ type: 'stop', id: 'r1' }]);
    ws.emit({ type: 'end', id: 'r1', seq: 5, conversation_id: 'c-1', message_id: 'm', usage: null, retriever_resources: [], stopped: true });
    await request.done;
    assert.equal(request.status, 'stopped');
    assert.equal(request.text, TOKENS.slice(0, 2).join(''));
  });

  test('a chat before the connection is open goes out on hello', async () => {
    const conn = connection();
    const request = conn.chat('early', { id: 'r1', conversationId: 'c-0' });
    await waitFor(() => FakeWebSocket.last, { what: 'a socket' });
    const ws = FakeWebSocket.last;
    assert.deepEqual(ws.sent, []);
    ws.accept();
    assert.deepEqual(ws.sent, [{ type: 'chat', id: 'r1', query: 'early', conversation_id: 'c-0' }]);
    assert.equal(request.status, 'sending');
  });
});

describe('reconnect and resume', () => {
  test('a dropped socket is replaced and in-flight requests resume after their last seq', async () => {
    const conn = connection();
    const ws1 = await opened(conn);
    const states = [];
    conn.on('state', (s) => states.push(s.state));
    const request = conn.chat('q', { id: 'r1' });
    const unacked = conn.chat('q2', { id: 'r2', conversationId: 'c-9' });
    const frames = answerFrames('r1', TOKENS);
    for (const f of frames.slice(0, 4)) ws1.emit(f);
    ws1.drop(1006);
    assert.equal(conn.state, 'reconnecting');
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a new socket' });
    ws2.accept();
    assert.deepEqual(ws2.sent, [
      { type: 'resume', id: 'r1', after: 4 },
      // never acknowledged: the same chat again, same id, same conversation
      { type: 'chat', id: 'r2', query: 'q2', conversation_id: 'c-9' },
    ]);
    for (const f of frames.slice(2)) ws2.emit(f); // the replay overlaps what we hold
    await request.done;
    assert.equal(request.text, ANSWER);
    assert.deepEqual(request.frames.map((f) => f.seq), frames.map((f) => f.seq));
    assert.equal(unacked.finished, false);
    assert.deepEqual(states, ['reconnecting', 'reconnecting', 'open']);
  });

  test('backoff grows with each failed attempt; a hello alone does not reset it, progress does', async () => {
    const conn = connection({ backoff: { initialMs: 4, maxMs: 16, factor: 2, jitter: 0 } });
    const ws1 = await opened(conn);
    conn.chat('q', { id: 'r1' });
    const delays = [];
    conn.on('state', (s) => s.state === 'reconnecting' && s.delayMs > 0 && delays.push(s.delayMs));
    ws1.drop(1006);
    for (let n = 2; n <= 5; n += 1) {
      const ws = await waitFor(() => FakeWebSocket.instances[n - 1], { what: `socket ${n}` });
      ws.drop(1006); // refused before hello
    }
    const ws6 = await waitFor(() => FakeWebSocket.instances[5], { what: 'socket 6' });
    ws6.accept();
    ws6.drop(4101); // hello, then at once a close: still backing off
    const ws7 = await waitFor(() => FakeWebSocket.instances[6], { what: 'socket 7' });
    ws7.accept();
    ws7.emit({ type: 'accepted', id: 'r1', seq: 1 }); // the request made progress
    ws7.drop(1006);
    await waitFor(() => FakeWebSocket.instances[7], { what: 'socket 8' });
    assert.deepEqual(delays, [4, 8, 16, 16, 16, 16, 4]);
  });

  test('a socket that stayed open stableAfterMs resets the backoff without progress', async () => {
    const conn = connection({ backoff: { initialMs: 4, maxMs: 64, factor: 2, jitter: 0 }, stableAfterMs: 30 });
    conn.chat('q', { id: 'r1' });
    const delays = [];
    conn.on('state', (s) => s.state === 'reconnecting' && s.delayMs > 0 && delays.push(s.delayMs));
    const ws1 = await waitFor(() => FakeWebSocket.instances[0], { what: 'socket 1' });
    ws1.accept();
    ws1.drop(1006);
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'socket 2' });
    ws2.accept();
    await sleep(50); // past stableAfterMs
    ws2.drop(1006);
    await waitFor(() => FakeWebSocket.instances[2], { what: 'socket 3' });
    assert.deepEqual(delays, [4, 4]);
  });

  test('backoffDelay: exponential, capped, jittered downwards', () => {
    const o = { initialMs: 100, maxMs: 1000, factor: 2, jitter: 0.5 };
    assert.deepEqual([0, 1, 2, 3, 4, 9].map((a) => backoffDelay(a, o, () => 0)), [100, 200, 400, 800, 1000, 1000]);
    assert.equal(backoffDelay(2, o, () => 0.999999), 200);
    for (let i = 0; i < 200; i += 1) {
      const d = backoffDelay(3, o);
      assert.ok(d >= 400 && d <= 800, `delay ${d} outside [400, 800]`);
    }
  });

  test('give_up closes (4003 forbidden) do not reconnect', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const errors = [];
    conn.on('error', (e) => errors.push(e.code));
    const request = conn.chat('q', { id: 'r1' });
    ws.drop(4003, 'forbidden');
    await sleep(60);
    assert.equal(conn.state, 'closed');
    assert.equal(FakeWebSocket.instances.length, 1);
    assert.deepEqual(errors, ['closed']);
    await request.done;
    assert.equal(request.error.code, 'connection_closed', 'in-flight requests end instead of waiting');
  });

  test('4100-4199 closes reconnect', async () => {
    const conn = connection();
    const ws = await opened(conn);
    conn.chat('q', { id: 'r1' });
    ws.drop(4100, 'draining');
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a new socket' });
    ws2.accept();
    assert.deepEqual(ws2.sent, [{ type: 'chat', id: 'r1', query: 'q' }]);
  });

  test('a normal close with nothing in flight reconnects only when needed', async () => {
    const conn = connection();
    const ws = await opened(conn);
    ws.drop(1000);
    await sleep(40);
    assert.equal(conn.state, 'idle');
    assert.equal(FakeWebSocket.instances.length, 1);
    conn.chat('later', { id: 'r9' });
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a new socket' });
    ws2.accept();
    assert.deepEqual(ws2.sentOfType('chat').map((f) => f.id), ['r9']);
  });

  test('4001 gives up at once: a refused token is not tried again', async () => {
    let n = 0;
    const conn = connection({ token: async () => `tok${++n}` });
    const ws1 = await opened(conn);
    assert.deepEqual(ws1.protocols, ['tokenwire.v1', 'bearer.tok1']);
    const errors = [];
    conn.on('error', (e) => errors.push(e.code));
    ws1.drop(4001, 'unauthorized');
    await sleep(60);
    assert.equal(FakeWebSocket.instances.length, 1);
    assert.equal(conn.state, 'closed');
    assert.deepEqual(errors, ['unauthorized']);
  });

  test('4002: a fresh token from the provider, reconnect, every request resumes', async () => {
    let n = 0;
    const conn = connection({ token: async () => `tok${++n}` });
    const ws1 = await opened(conn);
    const answered = conn.chat('q', { id: 'r1' });
    const unacked = conn.chat('q2', { id: 'r2' });
    const frames = answerFrames('r1', TOKENS);
    for (const f of frames.slice(0, 4)) ws1.emit(f);
    ws1.emit({ type: 'error', code: 'token_expired', message: 'the token expired', retryable: false });
    ws1.drop(4002, 'token expired');
    assert.equal(conn.state, 'reconnecting');
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a reconnect' });
    assert.deepEqual(ws2.protocols, ['tokenwire.v1', 'bearer.tok2']);
    ws2.accept();
    assert.deepEqual(ws2.sent, [
      { type: 'resume', id: 'r1', after: 4 },
      { type: 'chat', id: 'r2', query: 'q2' },
    ]);
    for (const f of frames.slice(4)) ws2.emit(f);
    await answered.done;
    assert.equal(answered.text, ANSWER);
    assert.equal(unacked.finished, false, 'nothing in flight was failed');
  });

  test('4002 again and again without progress gives up after MAX_REFRESH_TRIES', async () => {
    let n = 0;
    const conn = connection({ token: () => `stale${++n}` });
    const request = conn.chat('q', { id: 'r1' });
    for (let i = 0; i <= MAX_REFRESH_TRIES; i += 1) {
      const ws = await waitFor(() => FakeWebSocket.instances[i], { what: `socket ${i + 1}` });
      ws.accept();
      ws.drop(4002, 'token expired'); // hello, then expired at once: no progress
    }
    await request.done;
    assert.equal(conn.state, 'closed');
    assert.equal(FakeWebSocket.instances.length, MAX_REFRESH_TRIES + 1);
    assert.equal(request.error.code, 'connection_closed');
  });

  test('4002 with a fixed token gives up: there is nothing fresh to ask for', async () => {
    const conn = connection({ token: 'fixed' });
    const ws = await opened(conn);
    const request = conn.chat('q', { id: 'r1' });
    ws.drop(4002, 'token expired');
    await request.done;
    assert.equal(conn.state, 'closed');
    assert.equal(FakeWebSocket.instances.length, 1);
  });

  test('4103 idle: no reconnect until the application sends something', async () => {
    const conn = connection();
    const ws = await opened(conn);
    ws.drop(4103, 'idle');
    await sleep(60);
    assert.equal(conn.state, 'idle');
    assert.equal(FakeWebSocket.instances.length, 1, 'no reconnect by itself');
    conn.chat('back again', { id: 'r2' });
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a reconnect on chat' });
    ws2.accept();
    assert.deepEqual(ws2.sent, [{ type: 'chat', id: 'r2', query: 'back again' }]);
  });

  test('a wait_for_user close before hello rejects connect() instead of leaving it hanging', async () => {
    const conn = connection();
    const pending = conn.connect();
    const ws = await waitFor(() => FakeWebSocket.last, { what: 'a socket' });
    ws.drop(1000);
    await assert.rejects(pending, (e) => e.code === 'closed');
    assert.equal(conn.state, 'idle');
  });

  test('4103 racing a chat just sent: it reconnects and sends it', async () => {
    const conn = connection();
    const ws = await opened(conn);
    conn.chat('just now', { id: 'r3' });
    ws.drop(4103, 'idle');
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a reconnect' });
    ws2.accept();
    assert.deepEqual(ws2.sent, [{ type: 'chat', id: 'r3', query: 'just now' }]);
  });

  test('a retry hint before the close is the least wait', async () => {
    const conn = connection();
    const ws = await opened(conn);
    conn.chat('q', { id: 'r1' });
    const delays = [];
    conn.on('state', (s) => s.state === 'reconnecting' && s.delayMs > 0 && delays.push(s.delayMs));
    ws.emit({ type: 'error', code: 'too_many_connections', message: 'full', retryable: true, retry_after_ms: 30 });
    ws.drop(4004, 'too many connections');
    assert.deepEqual(delays, [30]);
  });

  test('a too_busy handshake: the wait is the hint plus jitter, never less', async () => {
    const conn = connection({ backoff: { initialMs: 5, maxMs: 40, factor: 2, jitter: 0.5 }, random: () => 0.5 });
    const ws = await opened(conn);
    conn.chat('q', { id: 'r1' });
    const delays = [];
    conn.on('state', (s) => s.state === 'reconnecting' && s.delayMs > 0 && delays.push(s.delayMs));
    ws.emit({ type: 'error', code: 'too_busy', message: 'busy', retryable: true, retry_after_ms: 400 });
    ws.drop(1013, 'too busy');
    assert.deepEqual(delays, [500]);
    assert.equal(hintDelay(400, { jitter: 0.5 }, () => 0), 400);
    assert.equal(hintDelay(400, { jitter: 0.5 }, () => 0.999999), 600);
  });

  test('a resume refused as too_busy is sent again after the hint; the request goes on', async () => {
    const conn = connection();
    const ws1 = await opened(conn);
    const request = conn.chat('q', { id: 'r1' });
    for (const f of answerFrames('r1', TOKENS).slice(0, 3)) ws1.emit(f);
    ws1.drop(1006);
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a new socket' });
    ws2.accept();
    assert.deepEqual(ws2.sent, [{ type: 'resume', id: 'r1', after: 3 }]);
    ws2.emit({ type: 'error', id: 'r1', code: 'too_busy', message: 'busy', retryable: true, retry_after_ms: 10 });
    assert.equal(request.finished, false);
    assert.deepEqual(request.refusals, [], 'not a form refusal');
    await waitFor(() => ws2.sent.length === 2, { what: 'the resume again' });
    assert.deepEqual(ws2.sent[1], { type: 'resume', id: 'r1', after: 3 });
    for (const f of answerFrames('r1', TOKENS).slice(3)) ws2.emit(f);
    assert.equal(request.status, 'done');
    assert.equal(request.text, TOKENS.join(''));
    assert.equal(FakeWebSocket.instances.length, 2, 'no reconnect for a refused resume');
  });

  test('a stop asked while disconnected is sent after the resume', async () => {
    const conn = connection();
    const ws1 = await opened(conn);
    const request = conn.chat('q', { id: 'r1' });
    for (const f of answerFrames('r1', TOKENS).slice(0, 3)) ws1.emit(f);
    ws1.drop(1006);
    request.stop();
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a new socket' });
    ws2.accept();
    assert.deepEqual(ws2.sent, [
      { type: 'resume', id: 'r1', after: 3 },
      { type: 'stop', id: 'r1' },
    ]);
  });

  test('an expired request fails with unknown_request instead of hanging', async () => {
    const conn = connection();
    const ws1 = await opened(conn);
    const request = conn.chat('q', { id: 'r1' });
    for (const f of answerFrames('r1', TOKENS).slice(0, 3)) ws1.emit(f);
    ws1.drop(1006);
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a new socket' });
    ws2.accept();
    ws2.emit({ type: 'error', id: 'r1', seq: 4, code: 'unknown_request', message: 'expired', retryable: false });
    await request.done;
    assert.equal(request.error.code, 'unknown_request');
  });

  test('close() is final: no reconnect', async () => {
    const conn = connection();
    const ws = await opened(conn);
    conn.chat('q', { id: 'r1' });
    conn.close();
    await sleep(40);
    assert.equal(conn.state, 'closed');
    assert.equal(ws.closedWith.code, 1000);
    assert.equal(FakeWebSocket.instances.length, 1);
  });
});

describe('oversize chats', () => {
  const LIMITS = { max_frame_bytes: 200 };
  const big = 'x'.repeat(300);

  test('a chat over hello.limits fails locally with frame_too_large and is never sent', async () => {
    const conn = connection();
    const pending = conn.connect();
    const ws = await waitFor(() => FakeWebSocket.last, { what: 'a socket' });
    ws.readyState = 1;
    ws.emit({ type: 'hello', session: 's', user: 'u1', protocol: 1, server: 'fake', limits: LIMITS });
    await pending;
    const request = conn.chat(big, { id: 'big' });
    assert.equal(request.status, 'error');
    assert.equal(request.error.code, 'frame_too_large');
    assert.equal(request.error.retryable, false);
    const small = conn.chat('small', { id: 'small' });
    assert.deepEqual(ws.sent, [{ type: 'chat', id: 'small', query: 'small' }]);
    assert.equal(small.finished, false);
    assert.equal(conn.requests.has('big'), false);
  });

  test('a chat asked before hello is checked against its limits, then never re-sent', async () => {
    const conn = connection();
    const request = conn.chat(big, { id: 'big' });
    const other = conn.chat('fine', { id: 'fine' });
    const ws = await waitFor(() => FakeWebSocket.last, { what: 'a socket' });
    ws.readyState = 1;
    ws.emit({ type: 'hello', session: 's', user: 'u1', protocol: 1, server: 'fake', limits: LIMITS });
    assert.equal(request.error?.code, 'frame_too_large');
    assert.deepEqual(ws.sent, [{ type: 'chat', id: 'fine', query: 'fine' }]);
    ws.drop(1006);
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a reconnect' });
    ws2.accept();
    assert.deepEqual(ws2.sentOfType('chat').map((f) => f.id), ['fine']);
    assert.equal(other.finished, false);
  });

  test('without announced limits, a 1009 close fails the oversize chat; the others resume', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const held = conn.chat('q', { id: 'r1' });
    for (const f of answerFrames('r1', TOKENS).slice(0, 3)) ws.emit(f);
    const request = conn.chat(big, { id: 'big' });
    ws.drop(1009, 'message too big');
    assert.equal(request.error?.code, 'frame_too_large');
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a reconnect' });
    ws2.accept();
    assert.deepEqual(ws2.sent, [{ type: 'resume', id: 'r1', after: 3 }]);
    assert.equal(held.finished, false);
  });

  test('without announced limits, a frame_too_large error fails the oversize chat', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const request = conn.chat(big, { id: 'big' });
    ws.emit({ type: 'error', code: 'frame_too_large', message: 'over the limit', retryable: false });
    await request.done;
    assert.equal(request.error.code, 'frame_too_large');
    assert.equal(conn.requests.size, 0);
  });
});

describe('close-code policy', () => {
  test('closePolicy reads the generated table', () => {
    assert.equal(closePolicy(4002), 'refresh_token');
    assert.equal(closePolicy(4103), 'wait_for_user');
    assert.equal(closePolicy(4001), 'give_up');
    assert.equal(closePolicy(1006), 'reconnect');
    assert.equal(closePolicy(4199), CLOSE_CODES.default);
    assert.equal(closePolicy(undefined), 'reconnect');
    for (const [code, { policy }] of Object.entries(CLOSE_CODES.codes)) {
      assert.equal(closePolicy(Number(code)), policy);
    }
  });
});

describe('heartbeat', () => {
  test('pings go out; a silent socket is replaced', async () => {
    const conn = connection({ pingIntervalMs: 15, pongTimeoutMs: 30 });
    const ws1 = await opened(conn);
    const pongs = [];
    conn.on('pong', (p) => pongs.push(p));
    await waitFor(() => ws1.sentOfType('ping').length >= 1, { what: 'a ping' });
    ws1.emit({ type: 'pong' });
    assert.equal(pongs.length, 1);
    // Now answer nothing: the connection must give up on this socket and open another.
    const ws2 = await waitFor(() => FakeWebSocket.instances[1], { what: 'a replacement socket' });
    assert.ok(ws1.closedWith, 'the silent socket was closed');
    ws2.accept();
    assert.equal(conn.state, 'open');
    conn.close();
  });

  test('a socket that never says hello is replaced', async () => {
    const conn = connection({ connectTimeoutMs: 20 });
    conn.connect().catch(() => {});
    await waitFor(() => FakeWebSocket.instances[1], { what: 'a second socket' });
    conn.close();
  });
});

describe('page reload', () => {
  test('unfinished requests are kept in storage and resume in a new Connection', async () => {
    const storage = new MemoryStorage();
    const first = connection({ storage });
    const ws1 = await opened(first);
    first.chat('q', { id: 'r1', conversationId: 'c-7' });
    const frames = answerFrames('r1', TOKENS);
    for (const f of frames.slice(0, 5)) ws1.emit(f);
    // The page goes away without a word; the gateway keeps answering into the frames stream.
    ws1.onclose = null;

    const second = connection({ storage, autoConnect: false });
    assert.equal(second.restored.length, 1);
    const request = second.restored[0];
    assert.equal(request.id, 'r1');
    assert.equal(request.lastSeq, 5);
    assert.equal(request.text, TOKENS.slice(0, 3).join(''));
    assert.equal(request.restored, true);
    const ws2 = await opened(second);
    assert.deepEqual(ws2.sent, [{ type: 'resume', id: 'r1', after: 5 }]);
    for (const f of frames) ws2.emit(f);
    await request.done;
    assert.equal(request.text, ANSWER);
    assert.equal(storage.map.size, 0, 'a finished request leaves storage');
  });

  test('a request never acknowledged before the reload is sent again as the same chat', async () => {
    const storage = new MemoryStorage();
    const first = connection({ storage });
    first.chat('q', { id: 'r1', conversationId: 'c-7', inputs: { k: 'v' } });
    const second = connection({ storage, autoConnect: false });
    const ws = await opened(second);
    assert.deepEqual(ws.sent, [{ type: 'chat', id: 'r1', query: 'q', conversation_id: 'c-7', inputs: { k: 'v' } }]);
    first.close();
  });
});

test('defaultUrl follows the page scheme', () => {
  assert.equal(defaultUrl({ protocol: 'https:', host: 'chat.example:8443' }), 'wss://chat.example:8443/v1/ws');
  assert.equal(defaultUrl({ protocol: 'http:', host: '127.0.0.1:8000' }), 'ws://127.0.0.1:8000/v1/ws');
});
