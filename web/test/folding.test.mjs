// The SDK's answer folding against the frame sequences both clients share: the same cases
// (tests/fixtures/answers.json) drive tests/unit/test_client_folding.py for the Python client,
// so the two clients cannot fold the same frames into different answers.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';

import { ChatRequest, Connection } from '../sdk/tokenwire.js';
import { FakeWebSocket } from './helpers/fakews.mjs';

const FIXTURE = new URL('../../tests/fixtures/answers.json', import.meta.url);
const { cases } = JSON.parse(readFileSync(FIXTURE, 'utf8'));

/** Feed `frames` of request `r` through the connection's receive path. */
function fold(frames) {
  const conn = new Connection({ url: 'ws://gw.test/v1/ws', WebSocket: FakeWebSocket, storage: null, autoConnect: false });
  const request = new ChatRequest(conn, { id: 'r', query: 'q' });
  conn.requests.set(request.id, request);
  for (const frame of frames) conn._receive({ ...structuredClone(frame), id: 'r' });
  return request;
}

describe('answer folding (tests/fixtures/answers.json)', () => {
  assert.ok(cases.length >= 10);
  for (const { name, frames, expected } of cases) {
    test(name, () => {
      const request = fold(frames);
      const seen = {
        text: request.text,
        status: request.status,
        error: request.error ? request.error.code : null,
        last_seq: request.lastSeq,
        seqs: request.frames.map((f) => f.seq),
        events: request.events.length,
        conversation_id: request.conversationId,
      };
      assert.deepEqual(Object.fromEntries(Object.keys(expected).map((k) => [k, seen[k]])), expected);
    });
  }
});
