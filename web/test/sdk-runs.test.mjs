// SDK: run() for workflow and completion apps, and answering a human-input form.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { connection, opened } from './helpers/fakeconn.mjs';

const FORM = { form_id: 'f-1', node_title: 'Approval', actions: [{ id: 'approve', title: 'OK' }] };

describe('runs', () => {
  test('a workflow run sends run, streams its text and ends with its outputs', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const request = conn.run({ ticket: 7 }, { id: 'w1', app: 'wf' });
    assert.deepEqual(ws.sent, [{ type: 'run', id: 'w1', inputs: { ticket: 7 }, app: 'wf' }]);
    const frames = [
      { type: 'accepted', id: 'w1', seq: 1 },
      { type: 'start', id: 'w1', seq: 2, conversation_id: null, message_id: null, task_id: 't' },
      { type: 'event', id: 'w1', seq: 3, event: 'workflow_started', data: {} },
      { type: 'delta', id: 'w1', seq: 4, text: 'Sum' },
      { type: 'delta', id: 'w1', seq: 5, text: 'mary' },
      {
        type: 'end', id: 'w1', seq: 6, conversation_id: null, message_id: null, usage: null,
        retriever_resources: [], stopped: false, outputs: { answer: 'Summary' },
        status: 'succeeded', workflow_run_id: 'wr-1',
      },
    ];
    for (const frame of frames) ws.emit(frame);
    await request.done;
    assert.equal(request.kind, 'run');
    assert.equal(request.text, 'Summary');
    assert.deepEqual(request.end.outputs, { answer: 'Summary' });
    assert.equal(request.end.workflow_run_id, 'wr-1');
  });

  test('a waiting form is answered with input; a refusal does not end the run', async () => {
    const conn = connection();
    const ws = await opened(conn);
    const request = conn.run({}, { id: 'h1', app: 'human' });
    ws.emit({ type: 'accepted', id: 'h1', seq: 1 });
    ws.emit({ type: 'start', id: 'h1', seq: 2, conversation_id: null, message_id: null, task_id: 't' });
    ws.emit({ type: 'event', id: 'h1', seq: 3, event: 'human_input_required', data: { data: FORM } });
    ws.emit({ type: 'event', id: 'h1', seq: 4, event: 'workflow_paused', data: {} });
    assert.equal(request.form.form_id, 'f-1');
    request.answer('approve', { comment: 'fine' });
    assert.deepEqual(ws.sent.at(-1), {
      type: 'input', id: 'h1', form_id: 'f-1', action: 'approve', inputs: { comment: 'fine' },
    });
    const refused = [];
    request.on('refused', (e) => refused.push(e.code));
    ws.emit({ type: 'error', id: 'h1', code: 'form_submitted', message: 'answered', retryable: false });
    assert.deepEqual(refused, ['form_submitted']);
    assert.equal(request.finished, false);
    ws.emit({ type: 'event', id: 'h1', seq: 5, event: 'human_input_form_filled', data: {} });
    assert.equal(request.form, null);
    assert.throws(() => request.answer('approve'), TypeError);
  });
});
