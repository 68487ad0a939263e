// A Connection over the in-process fake WebSocket, for the SDK's unit tests: `connection()`
// makes one with fast, unjittered backoff and no storage; `opened(conn)` plays the gateway's
// accept. Every connection made is closed after each test (one left open would reconnect into
// the next test's sockets).

import { afterEach, beforeEach } from 'node:test';

import { Connection } from '../../sdk/tokenwire.js';
import { FakeWebSocket } from './fakews.mjs';
import { waitFor } from './stack.mjs';

const made = [];

beforeEach(() => FakeWebSocket.reset());
afterEach(() => {
  for (const conn of made.splice(0)) conn.close();
});

export function connection(options = {}) {
  const conn = new Connection({
    url: 'ws://gw.test/v1/ws',
    user: 'u1',
    WebSocket: FakeWebSocket,
    storage: null,
    backoff: { initialMs: 5, maxMs: 40, factor: 2, jitter: 0 },
    pingIntervalMs: 0,
    ...options,
  });
  made.push(conn);
  return conn;
}

export async function opened(conn) {
  const pending = conn.connect();
  await waitFor(() => FakeWebSocket.last?.onmessage, { what: 'a socket' });
  FakeWebSocket.last.accept();
  await pending;
  return FakeWebSocket.last;
}
