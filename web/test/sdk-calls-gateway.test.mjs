// The SDK's calls and uploads against a real `tokenwire dev` (NATS, worker, gateway, Dify
// simulator): each user sees only their conversations, history pages, feedback, an upload
// used in the next chat, and another user's ids are not_found.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Connection, TokenwireError } from '../sdk/tokenwire.js';
import { NodeWebSocket } from './helpers/nodews.mjs';
import { startDev } from './helpers/stack.mjs';

const PNG = Buffer.from(
  '89504e470d0a1a0a0000000d4948445200000001000000010806000000' +
    '1f15c4890000000d49444154789c63000100000500010d0a2db40000000049454e44ae426082',
  'hex',
);

let dev;
const connections = [];

function connect(user) {
  const conn = new Connection({ url: dev.wsUrl, user, WebSocket: NodeWebSocket, storage: null });
  connections.push(conn);
  return conn;
}

describe('SDK calls over a real gateway', { timeout: 150000 }, () => {
  before(async () => {
    dev = await startDev();
  });

  after(async () => {
    for (const conn of connections) conn.close();
    await dev?.stop();
  });

  test('hello names the features; conversations and history are per user', async () => {
    const ada = connect(`ada-${Date.now()}`);
    const bob = connect(`bob-${Date.now()}`);
    await Promise.all([ada.connect(), bob.connect()]);
    assert.ok(ada.hello.features.includes('call') && ada.hello.features.includes('files'));
    const first = await ada.chat('first question').done;
    const conversationId = first.conversationId;
    await ada.chat('second question', { conversationId }).done;
    await bob.chat('bob asks').done;

    const mine = await ada.conversations.list({ limit: 100 });
    assert.deepEqual(mine.data.map((c) => c.id), [conversationId]);
    const history = await ada.messages.list({ conversation_id: conversationId, limit: 1 });
    assert.equal(history.has_more, true);
    assert.equal(history.data[0].query, 'second question');
    const older = await ada.messages.list({
      conversation_id: conversationId,
      first_id: history.data[0].id,
    });
    assert.deepEqual(older.data.map((m) => m.query), ['first question']);
    assert.deepEqual(await ada.feedback(first.end.message_id, 'like'), { result: 'success' });

    await assert.rejects(
      bob.messages.list({ conversation_id: conversationId }),
      (err) => err instanceof TokenwireError && err.code === 'not_found',
    );
    await assert.rejects(
      bob.call('apps.delete'),
      (err) => err instanceof TokenwireError && err.code === 'unknown_method',
    );
  });

  test('an upload is used in the next chat, and only by its uploader', async () => {
    const carol = connect(`carol-${Date.now()}`);
    const dan = connect(`dan-${Date.now()}`);
    await Promise.all([carol.connect(), dan.connect()]);
    const file = await carol.upload(new Blob([PNG], { type: 'image/png' }), { filename: 'dot.png' });
    assert.equal(file.name, 'dot.png');
    assert.equal(file.size, PNG.length);
    const ref = { type: 'image', transfer_method: 'local_file', upload_file_id: file.id };
    const answered = await carol.chat('what is this?', { files: [ref] }).done;
    assert.equal(answered.status, 'done');
    const refused = dan.chat('and this?', { files: [ref] });
    await refused.done.catch(() => {});
    assert.equal(refused.status, 'error');
    assert.equal(refused.error.code, 'not_found');
  });
});
