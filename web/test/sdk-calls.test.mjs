// SDK calls and uploads: the test plays the gateway through the in-process fake WebSocket,
// and fetch through a function that records what it was asked.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { TokenwireError } from '../sdk/tokenwire.js';
import { connection, opened } from './helpers/fakeconn.mjs';
import { FakeWebSocket } from './helpers/fakews.mjs';
import { waitFor } from './helpers/stack.mjs';

test('a call sends one call frame and resolves with its result', async () => {
  const conn = connection();
  const ws = await opened(conn);
  const page = conn.conversations.list({ limit: 5 });
  const [frame] = ws.sentOfType('call');
  assert.equal(frame.method, 'conversations.list');
  assert.deepEqual(frame.params, { limit: 5 });
  ws.emit({ type: 'result', id: frame.id, data: { data: [], has_more: false, limit: 5 } });
  assert.deepEqual(await page, { data: [], has_more: false, limit: 5 });
});

test("a call's error rejects with the protocol's code and does not reach the error event", async () => {
  const conn = connection();
  const ws = await opened(conn);
  const seen = [];
  conn.on('error', (e) => seen.push(e));
  const history = conn.messages.list({ conversation_id: 'c-theirs' });
  const [frame] = ws.sentOfType('call');
  ws.emit({ type: 'error', id: frame.id, code: 'not_found', message: 'no', retryable: false });
  await assert.rejects(history, (err) => err instanceof TokenwireError && err.code === 'not_found');
  assert.deepEqual(seen, []);
});

test('the typed helpers name the methods and params of the protocol', async () => {
  const conn = connection();
  const ws = await opened(conn);
  const pending = [
    conn.feedback('m1', 'like'),
    conn.suggested('m1'),
    conn.parameters({ app: 'sales' }),
    conn.runDetails('run-1'),
  ];
  const frames = ws.sentOfType('call');
  assert.deepEqual(
    frames.map((f) => [f.method, f.params]),
    [
      ['messages.feedback', { message_id: 'm1', rating: 'like' }],
      ['messages.suggested', { message_id: 'm1' }],
      ['app.parameters', { app: 'sales' }],
      ['runs.get', { workflow_run_id: 'run-1' }],
    ],
  );
  ws.emit({ type: 'result', id: frames[1].id, data: { result: 'success', data: ['why?'] } });
  assert.deepEqual(await pending[1], ['why?']);
  for (const f of [frames[0], frames[2], frames[3]]) ws.emit({ type: 'result', id: f.id, data: {} });
  await Promise.all(pending);
});

test('a call whose socket dropped before its answer is sent again after the reconnect', async () => {
  const conn = connection();
  const ws = await opened(conn);
  const info = conn.info();
  const [frame] = ws.sentOfType('call');
  ws.drop(1006, 'network');
  await waitFor(() => FakeWebSocket.last !== ws && FakeWebSocket.last?.onmessage, { what: 'a new socket' });
  const again = FakeWebSocket.last;
  again.accept();
  await waitFor(() => again.sentOfType('call').length === 1, { what: 'the call again' });
  assert.equal(again.sentOfType('call')[0].id, frame.id);
  again.emit({ type: 'result', id: frame.id, data: { name: 'Support' } });
  assert.deepEqual(await info, { name: 'Support' });
});

test('upload posts the file to /v1/files as the socket authenticates, app first', async () => {
  const asked = [];
  const fetch = async (url, init) => {
    asked.push({ url, init });
    return new Response(JSON.stringify({ id: 'f1', name: 'a.png', size: 1, mime_type: 'image/png' }), {
      status: 201,
    });
  };
  const conn = connection({ fetch });
  const file = await conn.upload(new Blob(['x'], { type: 'image/png' }), { filename: 'a.png', app: 'sales' });
  assert.equal(file.id, 'f1');
  assert.equal(asked[0].url, 'http://gw.test/v1/files?user=u1');
  assert.deepEqual([...asked[0].init.body.keys()], ['app', 'file']);

  const withToken = connection({ fetch, token: async () => 'jwt', user: null, url: 'wss://gw.test/v1/ws' });
  await withToken.upload(new Blob(['x']), { filename: 'a.png' });
  assert.equal(asked[1].url, 'https://gw.test/v1/files');
  assert.equal(asked[1].init.headers.Authorization, 'Bearer jwt');
});

test("an upload refused by the gateway rejects with the protocol's error", async () => {
  const fetch = async () =>
    new Response(JSON.stringify({ type: 'error', code: 'file_too_large', message: 'big', retryable: false }), {
      status: 413,
    });
  const conn = connection({ fetch });
  await assert.rejects(
    conn.upload(new Blob(['x']), { filename: 'big.png' }),
    (err) => err instanceof TokenwireError && err.code === 'file_too_large' && !err.retryable,
  );
});
