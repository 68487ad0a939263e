// The full web client at / in Debian's Chromium (playwright-core) against a real `tokenwire dev`
// (gateway, worker, NATS and the Dify simulator with its demo apps): opening statement and
// suggested questions, follow-ups, feedback reaching Dify, the conversation sidebar, image
// attachments, a workflow's run form and a human-input form answered after a reload, and
// keyboard-only use. Screenshots go to <repo>/test-artifacts/ (and a few to docs/screenshots/).

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { launchChromium } from '../helpers/browser.mjs';

import { ARTIFACTS_DIR, REPO_DIR, startDev, waitFor } from '../helpers/stack.mjs';

// A fake microphone (a beep) that needs no permission prompt, for voice input.
const FAKE_MICROPHONE = ['--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream'];
const DOCS_SHOTS = join(REPO_DIR, 'docs', 'screenshots');
// A 1×1 PNG.
const PNG = Buffer.from(
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==',
  'base64',
);

let dev;
let browser;
let simBase;

async function sim(path) {
  const response = await fetch(`${simBase}${path}`);
  return response.json();
}

async function openPage({ viewport = { width: 1200, height: 820 }, mobile = false, colorScheme = 'light', app = null } = {}) {
  const context = await browser.newContext({
    viewport,
    colorScheme,
    ...(mobile ? { deviceScaleFactor: 2, isMobile: true, hasTouch: true } : {}),
  });
  if (app) await context.addInitScript((name) => localStorage.setItem('tokenwire.app', name), app);
  const page = await context.newPage();
  const log = { errors: [], sent: [] };
  page.on('pageerror', (err) => log.errors.push(String(err)));
  page.on('console', (msg) => {
    if (msg.type() === 'error') log.errors.push(msg.text());
  });
  page.on('websocket', (ws) => {
    ws.on('framesent', ({ payload }) => {
      try {
        log.sent.push(JSON.parse(String(payload)));
      } catch {
        // not ours
      }
    });
  });
  await page.goto(dev.url);
  await page.waitForSelector('[data-testid=connection-status][data-state=open]');
  return { page, context, log };
}

async function finished(page, index, timeout = 45000) {
  await page.waitForFunction(
    (i) => ['done', 'stopped', 'error'].includes(document.querySelectorAll('[data-testid=answer]')[i]?.dataset.state),
    index,
    { timeout },
  );
  return page.evaluate((i) => {
    const turn = document.querySelectorAll('[data-testid=turn]')[i];
    return {
      state: turn.querySelector('[data-testid=answer]').dataset.state,
      text: turn.querySelector('[data-testid=answer]').innerText,
      status: turn.querySelector('[data-testid=request-status]').textContent,
      id: turn.dataset.requestId,
    };
  }, index);
}

async function ask(page, text) {
  const n = await page.locator('[data-testid=answer]').count();
  await page.fill('[data-testid=question]', text);
  await page.press('[data-testid=question]', 'Enter');
  await page.waitForFunction((k) => document.querySelectorAll('[data-testid=answer]').length > k, n);
  return n;
}

async function snap(page, name, { docs = false } = {}) {
  mkdirSync(ARTIFACTS_DIR, { recursive: true });
  await page.screenshot({ path: join(ARTIFACTS_DIR, `client-${name}.png`) });
  if (docs) {
    mkdirSync(DOCS_SHOTS, { recursive: true });
    await page.screenshot({ path: join(DOCS_SHOTS, `${name}.png`) });
  }
}

/** Press Tab until `selector` has the focus (keyboard only), at most `max` times. */
async function tabTo(page, selector, max = 60) {
  for (let i = 0; i < max; i += 1) {
    if (await page.evaluate((s) => document.activeElement?.matches(s), selector)) return;
    await page.keyboard.press('Tab');
  }
  throw new Error(`Tab never reached ${selector}`);
}

describe('the web client at / (Chromium, tokenwire dev)', { timeout: 300000 }, () => {
  before(async () => {
    dev = await startDev();
    const match = /"dify":"(http:\/\/[^"]+?)\/v1"/.exec(dev.log());
    assert.ok(match, 'the worker says which Dify (the simulator) it talks to');
    simBase = match[1];
    browser = await launchChromium(FAKE_MICROPHONE);
  });

  after(async () => {
    await browser?.close();
    await dev?.stop();
  });

  test('opening statement and suggested questions; a suggestion asks; follow-ups; a like reaches Dify', async () => {
    const { page, context, log } = await openPage({ app: 'chat' });
    await page.waitForSelector('[data-testid=opening-statement]:not([hidden])');
    assert.match(await page.textContent('[data-testid=opening-statement]'), /Hi! I am Demo chat/);
    const suggestions = page.locator('[data-testid=suggested-question]');
    assert.deepEqual(await suggestions.allInnerTexts(), ['What can you do?', 'Tell me about tokenwire.']);
    assert.equal(await page.isVisible('[data-testid=app-picker]'), true, 'several apps: a picker');
    await snap(page, 'welcome', { docs: true });

    await suggestions.first().click();
    const got = await finished(page, 0);
    assert.equal(got.state, 'done', got.status);
    const chat = log.sent.find((f) => f.type === 'chat');
    assert.equal(chat.query, 'What can you do?');
    assert.equal(chat.app, 'chat');

    const followups = page.locator('[data-testid=follow-up]');
    await followups.first().waitFor();
    assert.ok((await followups.count()) >= 1);

    const messageId = await page.evaluate(() => window.__tokenwire.page.turns[0].record.messageId);
    assert.ok(messageId, 'the answer has a message id');
    await page.click('[data-testid=like]');
    await page.waitForSelector('[data-testid=like][aria-pressed=true]');
    const calls = await waitFor(async () => {
      const all = await sim('/_sim/calls');
      const hits = all.filter((c) => c.method === 'POST' && c.path.endsWith('/feedbacks'));
      return hits.length ? hits : null;
    }, { what: 'a feedback call at Dify' });
    assert.equal(calls[0].path, `/v1/messages/${messageId}/feedbacks`);
    assert.equal(calls[0].body.rating, 'like');
    // An optional comment goes with the same rating.
    await page.fill('[data-testid=feedback-comment]', 'Very clear');
    await page.press('[data-testid=feedback-comment]', 'Enter');
    await waitFor(async () => (await sim('/_sim/calls')).some((c) => c.path.endsWith('/feedbacks') && c.body?.content === 'Very clear'), { what: 'the comment at Dify' });
    await snap(page, 'answer-tools', { docs: true });

    // A follow-up asks in the same conversation.
    const text = await followups.first().innerText();
    await followups.first().click();
    await finished(page, 1);
    const chats = log.sent.filter((f) => f.type === 'chat');
    assert.equal(chats[1].query, text);
    assert.ok(chats[1].conversation_id, 'the follow-up continues the conversation');
    assert.deepEqual(log.errors, []);
    await context.close();
  });

  test('the sidebar lists conversations; picking one loads its history; rename and delete', async () => {
    const { page, context } = await openPage({ app: 'chat' });
    const query = `Sidebar history ${Date.now()}`;
    const i = await ask(page, query);
    const answer = (await finished(page, i)).text;
    await page.waitForSelector('[data-testid=conversation]');
    await page.click('[data-testid=new-conversation]');
    assert.equal(await page.locator('[data-testid=turn]').count(), 0);

    const conversationId = await page.evaluate(() => window.__tokenwire.connection.conversations.list({ app: 'chat' }).then((p) => p.data[0].id));
    const item = page.locator(`[data-testid=conversation][data-conversation-id="${conversationId}"]`);
    await item.locator('[data-testid=conversation-pick]').click();
    await page.waitForSelector('[data-testid=turn]');
    assert.equal(await page.locator('[data-testid=turn] .question').first().innerText(), query);
    assert.equal((await page.locator('[data-testid=answer]').first().innerText()).replace(/\s+/g, ' ').trim(), answer.replace(/\s+/g, ' ').trim());
    assert.equal(await item.locator('[data-testid=conversation-pick]').getAttribute('aria-current'), 'true');
    await snap(page, 'history', { docs: true });

    // Rename inline.
    await item.locator('[data-testid=conversation-rename]').click();
    await page.fill('[data-testid=conversation-name]', 'Renamed chat');
    await page.press('[data-testid=conversation-name]', 'Enter');
    await waitFor(async () => (await item.locator('[data-testid=conversation-pick]').innerText()) === 'Renamed chat', { what: 'the new name' });
    const listed = await page.evaluate(() => window.__tokenwire.connection.conversations.list({ app: 'chat' }).then((p) => p.data));
    assert.equal(listed.find((c) => c.id === conversationId).name, 'Renamed chat');

    // Delete asks once more, then goes.
    await item.locator('[data-testid=conversation-delete]').click();
    await item.locator('[data-testid=conversation-delete]').click();
    await item.waitFor({ state: 'detached' });
    assert.equal(await page.locator('[data-testid=turn]').count(), 0, 'the open conversation was deleted: a new chat');
    await context.close();
  });

  test('an attached image reaches Dify with the chat', async () => {
    const { page, context, log } = await openPage({ app: 'chat' });
    await page.waitForSelector('[data-testid=attach]:not([hidden])');
    await page.setInputFiles('[data-testid=file-input]', { name: 'dot.png', mimeType: 'image/png', buffer: PNG });
    await page.waitForSelector('[data-testid=attachment][data-state=ready]');
    await snap(page, 'attachment');
    const query = `What is in this image ${Date.now()}`;
    const i = await ask(page, query);
    await finished(page, i);
    const chat = log.sent.find((f) => f.type === 'chat' && f.query === query);
    assert.equal(chat.files.length, 1);
    assert.equal(chat.files[0].type, 'image');
    const requests = await sim('/_sim/requests');
    const atDify = requests.find((r) => r.query === query);
    assert.ok(atDify, 'Dify was asked');
    assert.equal(atDify.files?.[0]?.upload_file_id, chat.files[0].upload_file_id);
    assert.equal(atDify.files[0].transfer_method, 'local_file');
    assert.equal(await page.locator('[data-testid=attachment]').count(), 0, 'sent with that chat only');
    await context.close();
  });

  test('paste and drag-and-drop attach too; the limits of the app are kept; no attach where uploads are off', async () => {
    const { page, context, log } = await openPage({ app: 'chat' });
    await page.waitForSelector('[data-testid=attach]:not([hidden])');
    const b64 = PNG.toString('base64');
    await page.evaluate((data) => {
      const file = (name) => new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name, { type: 'image/png' });
      const paste = new DataTransfer();
      paste.items.add(file('pasted.png'));
      document.querySelector('[data-testid=question]').dispatchEvent(new ClipboardEvent('paste', { clipboardData: paste, bubbles: true, cancelable: true }));
      const drop = new DataTransfer();
      for (const name of ['dropped-1.png', 'dropped-2.png', 'dropped-3.png']) drop.items.add(file(name));
      document.querySelector('[data-testid=transcript]').dispatchEvent(new DragEvent('drop', { dataTransfer: drop, bubbles: true, cancelable: true }));
    }, b64);
    // The demo app takes 3 images: the 4th is refused on the page, before any upload.
    await waitFor(async () => (await page.locator('[data-testid=attachment][data-state=ready]').count()) === 3, { what: '3 uploads' });
    assert.equal(await page.locator('[data-testid=attachment][data-state=error]').count(), 1);
    assert.match(await page.locator('[data-testid=attachment][data-state=error]').innerText(), /at most 3 files/);
    const query = `Three images ${Date.now()}`;
    const i = await ask(page, query);
    await finished(page, i);
    const chat = log.sent.find((f) => f.type === 'chat' && f.query === query);
    assert.equal(chat.files.length, 3);
    const atDify = (await sim('/_sim/requests')).find((r) => r.query === query);
    assert.deepEqual(atDify.files.map((f) => f.upload_file_id), chat.files.map((f) => f.upload_file_id));
    await context.close();

    // The default app has uploads off: no attach button.
    const plain = await openPage();
    await plain.page.waitForSelector('[data-testid=opening-statement]:not([hidden])');
    assert.equal(await plain.page.isHidden('[data-testid=attach]'), true);
    await plain.context.close();
  });

  test('a request Dify refuses for good shows failed, with its code; the page goes on', async () => {
    const { page, context } = await openPage({ app: 'chat' });
    await page.waitForSelector('[data-testid=opening-statement]:not([hidden])');
    await page.evaluate(() => window.__tokenwire.page.ask('Refused at Dify', { inputs: { tw_sim: { fault: '400' } } }));
    const got = await finished(page, 0);
    assert.equal(got.state, 'error');
    assert.match(got.status, /^Failed: \S+/);
    assert.equal(await page.locator('[data-testid=turn] >> nth=0 >> [data-testid=like]').count(), 0, 'no feedback on a failure');
    const i = await ask(page, 'And now a good one');
    assert.equal((await finished(page, i)).state, 'done');
    await snap(page, 'failed');
    await context.close();
  });

  test('a reload mid-answer says the answer was resumed', async () => {
    const { page, context } = await openPage({ app: 'chat' });
    const i = await ask(page, '/slow resumed after a reload');
    await page.waitForFunction((k) => document.querySelectorAll('[data-testid=answer]')[k].textContent.length > 5, i);
    await page.reload();
    await page.waitForSelector('[data-testid=request-status][data-kind=resumed]');
    const got = await finished(page, 0);
    assert.equal(got.state, 'done', got.status);
    await context.close();
  });

  test('a workflow waits for a person: the form is answered from the page after a reload, the run finishes', async () => {
    const { page, context, log } = await openPage({ app: 'human' });
    await page.waitForSelector('[data-testid=run-form]:not([hidden])');
    assert.equal(await page.isHidden('[data-testid=ask-form]'), true, 'a workflow app has a run form, not a chat box');
    await page.fill('[data-testid=input-query]', 'Customer asks for a refund');
    await page.click('[data-testid=run]');
    await page.waitForSelector('[data-testid=human-input]:not([hidden])', { timeout: 30000 });
    const run = log.sent.find((f) => f.type === 'run');
    assert.equal(run.app, 'human');
    assert.equal(run.inputs.query, 'Customer asks for a refund');

    await page.reload();
    await page.waitForSelector('[data-testid=connection-status][data-state=open]');
    await page.waitForSelector('[data-testid=human-input]:not([hidden])', { timeout: 30000 });
    assert.match(await page.innerText('[data-testid=human-input]'), /Please review the draft reply/);
    await snap(page, 'human-input', { docs: true });

    // Keyboard only: type a comment, then the Approve button.
    await page.focus('[data-testid=human-input] textarea');
    await page.keyboard.type('Looks good');
    await tabTo(page, '[data-testid=form-action-approve]');
    await page.keyboard.press('Enter');
    const got = await finished(page, 0, 60000);
    assert.equal(got.state, 'done', got.status);
    await page.waitForSelector('[data-testid=outputs]:not([hidden])');
    const calls = await sim('/_sim/calls');
    const submitted = calls.find((c) => c.method === 'POST' && c.path.startsWith('/v1/form/human_input/'));
    assert.ok(submitted, 'the form was submitted to Dify');
    assert.equal(submitted.body.action, 'approve');
    assert.equal(submitted.body.inputs.comment, 'Looks good');
    await snap(page, 'workflow-outputs');
    await context.close();
  });

  test('human input beyond text: a select and a number in the form, answered by keyboard alone, reach Dify', async () => {
    // The simulator's form has one paragraph; the gateway's real event gets two more fields on
    // its way to the page (as a Dify form with a select and a number sends them).
    const context = await browser.newContext({ viewport: { width: 1200, height: 820 } });
    await context.addInitScript(() => localStorage.setItem('tokenwire.app', 'human'));
    await context.routeWebSocket(/\/v1\/ws/, (ws) => {
      const server = ws.connectToServer();
      ws.onMessage((message) => server.send(message));
      server.onMessage((message) => {
        const frame = JSON.parse(String(message));
        if (frame.type === 'event' && frame.event === 'human_input_required') {
          const form = frame.data.data ?? frame.data; // the frame's data is Dify's whole event
          form.inputs.push(
            { type: 'select', output_variable_name: 'priority', options: ['low', 'normal', 'high'], default: { type: 'constant', selector: [], value: 'normal' } },
            { type: 'number', output_variable_name: 'hours', default: { type: 'constant', selector: [], value: '' } },
          );
          form.resolved_default_values.priority = 'normal';
        }
        ws.send(JSON.stringify(frame));
      });
    });
    const page = await context.newPage();
    await page.goto(dev.url);
    await page.waitForSelector('[data-testid=input-query]');
    await page.focus('[data-testid=input-query]');
    await page.keyboard.type('Rich form please');
    await tabTo(page, '[data-testid=run]');
    await page.keyboard.press('Enter');
    await page.waitForSelector('[data-testid=human-input]:not([hidden])', { timeout: 30000 });
    assert.equal(await page.evaluate(() => document.querySelector('[data-testid=form-input-priority]').tagName), 'SELECT');
    assert.equal(await page.inputValue('[data-testid=form-input-priority]'), 'normal', 'the default is chosen');
    assert.equal(await page.getAttribute('[data-testid=form-input-hours]', 'type'), 'number');

    // Keyboard only from the transcript on: Tab to the comment, type, Tab to the select and
    // move down one choice, Tab to the number and type it, Tab to Approve and press Space.
    await tabTo(page, '[data-testid=form-input-comment]');
    await page.keyboard.type('Urgent one');
    await page.keyboard.press('Tab');
    assert.equal(await page.evaluate(() => document.activeElement.dataset.testid), 'form-input-priority');
    await page.keyboard.press('ArrowDown');
    await page.keyboard.press('Tab');
    await page.keyboard.type('2.5');
    await tabTo(page, '[data-testid=form-action-approve]');
    await page.keyboard.press('Space');
    const got = await finished(page, 0, 60000);
    assert.equal(got.state, 'done', got.status);
    const submitted = (await sim('/_sim/calls')).filter((c) => c.method === 'POST' && c.path.startsWith('/v1/form/human_input/')).find((c) => c.body.inputs.comment === 'Urgent one');
    assert.ok(submitted, 'the form was submitted to Dify');
    assert.deepEqual(submitted.body.inputs, { comment: 'Urgent one', priority: 'high', hours: 2.5 });
    assert.equal(submitted.body.action, 'approve');
    await context.close();
  });

  test('the app picker switches apps; a workflow shows its outputs, a completion its answer', async () => {
    const { page, context, log } = await openPage();
    await page.waitForSelector('[data-testid=app-picker]');
    const options = await page.locator('[data-testid=app-picker] option').evaluateAll((els) => els.map((e) => e.value));
    for (const name of ['default', 'chat', 'agent', 'chatflow', 'workflow', 'completion', 'human']) assert.ok(options.includes(name), name);
    await page.selectOption('[data-testid=app-picker]', 'workflow');
    await page.waitForSelector('[data-testid=input-query]');
    await page.fill('[data-testid=input-query]', 'Printer broken; toner empty');
    await page.click('[data-testid=run]');
    const wf = await finished(page, 0, 60000);
    assert.equal(wf.state, 'done', wf.status);
    await page.waitForSelector('[data-testid=outputs]:not([hidden])');
    assert.equal(await page.isHidden('[data-testid=workflow]'), false, 'the steps are shown');
    await snap(page, 'workflow', { docs: true });

    await page.selectOption('[data-testid=app-picker]', 'completion');
    await page.waitForSelector('[data-testid=input-topic]');
    assert.equal(await page.locator('[data-testid=turn]').count(), 0, 'another app starts over');
    await page.fill('[data-testid=input-topic]', 'queues');
    await page.press('[data-testid=input-topic]', 'Enter'); // Enter in a text field runs it
    const c = await finished(page, 0, 60000);
    assert.equal(c.state, 'done', c.status);
    assert.ok(c.text.length > 0);
    const runs = log.sent.filter((f) => f.type === 'run');
    assert.deepEqual(runs.map((r) => r.app), ['workflow', 'completion']);
    assert.equal(runs[1].inputs.topic, 'queues');
    await context.close();
  });

  test('keyboard only: send, stop, new chat, feedback', async () => {
    const { page, context, log } = await openPage({ app: 'chat' });
    await page.waitForSelector('[data-testid=opening-statement]:not([hidden])');
    assert.equal(await page.evaluate(() => document.activeElement.dataset.testid), 'question', 'the question has the focus');
    await page.keyboard.type('/slow a long answer to stop');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => document.querySelector('[data-testid=answer]')?.textContent.length > 5);
    await tabTo(page, '[data-testid=stop]:not([disabled])');
    await page.keyboard.press('Enter');
    const stopped = await finished(page, 0);
    assert.equal(stopped.state, 'stopped');

    await page.focus('[data-testid=question]');
    await page.keyboard.type('Keyboard question');
    await page.keyboard.press('Enter');
    const got = await finished(page, 1);
    assert.equal(got.state, 'done');
    await page.waitForFunction(() => document.querySelectorAll('[data-testid=like]').length >= 2);
    await page.locator('[data-testid=like]').nth(1).focus();
    await page.keyboard.press('Tab'); // to Dislike
    assert.equal(await page.evaluate(() => document.activeElement.dataset.testid), 'dislike');
    await page.keyboard.press('Space');
    await page.waitForSelector('[data-testid=dislike][aria-pressed=true]');
    const messageId = await page.evaluate(() => window.__tokenwire.page.turns[1].record.messageId);
    await waitFor(async () => (await sim('/_sim/calls')).some((c) => c.path === `/v1/messages/${messageId}/feedbacks` && c.body?.rating === 'dislike'), { what: 'the dislike at Dify' });

    await tabTo(page, '[data-testid=new-conversation]');
    await page.keyboard.press('Enter');
    assert.equal(await page.locator('[data-testid=turn]').count(), 0);
    assert.equal(await page.evaluate(() => document.activeElement.dataset.testid), 'question', 'New chat gives the focus back');
    assert.ok(log.sent.some((f) => f.type === 'stop'));
    await context.close();
  });

  test('voice input: recorded, transcribed by Dify (audio-to-text), put in the question', async () => {
    const { page, context } = await openPage({ app: 'chat' });
    await context.grantPermissions(['microphone']);
    await page.waitForSelector('[data-testid=voice]:not([hidden])');
    await page.click('[data-testid=voice]');
    await page.waitForSelector('[data-testid=voice][aria-pressed=true]');
    await page.waitForTimeout(1200);
    await page.click('[data-testid=voice]');
    await page.waitForFunction(() => document.querySelector('[data-testid=question]').value.length > 0, null, { timeout: 20000 });
    const calls = await sim('/_sim/calls');
    assert.ok(calls.some((c) => c.method === 'POST' && c.path === '/v1/audio-to-text'), 'Dify transcribed it');
    await context.close();
  });

  test('the sidebar pages: more than a page of conversations shows "Load more"', async () => {
    const { page, context } = await openPage({ app: 'agent' });
    // 21 conversations of a fresh app (one page is 20), started over the SDK.
    await page.evaluate(async () => {
      const { connection } = window.__tokenwire;
      for (let i = 0; i < 21; i += 1) await connection.chat(`Paging ${i}`, { app: 'agent' }).done;
    });
    await page.reload();
    await page.waitForSelector('[data-testid=connection-status][data-state=open]');
    await page.waitForSelector('[data-testid=conversations-more]:not([hidden])');
    assert.equal(await page.locator('[data-testid=conversation]').count(), 20);
    await page.click('[data-testid=conversations-more]');
    await waitFor(async () => (await page.locator('[data-testid=conversation]').count()) === 21, { what: 'the second page' });
    assert.equal(await page.isHidden('[data-testid=conversations-more]'), true);
    const ids = await page.locator('[data-testid=conversation]').evaluateAll((els) => els.map((e) => e.dataset.conversationId));
    assert.equal(new Set(ids).size, 21, 'no conversation twice');
    await context.close();
  });

  test('screenshots: desktop and phone, light and dark', async () => {
    for (const colorScheme of ['light', 'dark']) {
      for (const [name, viewport, mobile] of [['desktop', { width: 1200, height: 820 }, false], ['phone', { width: 390, height: 780 }, true]]) {
        const { page, context, log } = await openPage({ viewport, mobile, colorScheme, app: 'chat' });
        await page.waitForSelector('[data-testid=opening-statement]:not([hidden])');
        const i = await ask(page, 'Show me **Markdown** with a list');
        await finished(page, i);
        await page.locator('[data-testid=follow-up]').first().waitFor();
        const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
        assert.ok(overflow <= 0, `${name} scrolls sideways by ${overflow}px`);
        await snap(page, `${name}-${colorScheme}`, { docs: true });
        if (mobile) {
          await page.click('[data-testid=sidebar-toggle]');
          await page.waitForSelector('[data-testid=sidebar] [data-testid=conversation]');
          assert.equal(await page.isVisible('[data-testid=sidebar]'), true);
          await snap(page, `phone-sidebar-${colorScheme}`, { docs: colorScheme === 'light' });
          assert.equal(await page.evaluate(() => document.activeElement.dataset.testid), 'conversation-pick', 'the opened list has the focus');
          await page.keyboard.press('Escape');
          assert.equal(await page.isVisible('[data-testid=sidebar]'), false, 'Escape closes it');
          assert.equal(await page.evaluate(() => document.activeElement.dataset.testid), 'sidebar-toggle');
          await page.keyboard.press('Enter');
          await page.keyboard.press('Enter'); // picks the conversation: its history, the list closes
          await page.waitForSelector('[data-testid=sidebar]', { state: 'hidden' });
          assert.equal(await page.locator('[data-testid=turn]').count(), 1);
        }
        assert.deepEqual(log.errors, []);
        await context.close();
      }
    }
  });
});
