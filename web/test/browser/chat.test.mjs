// The web chat page in Debian's Chromium (driven by playwright-core) against `tokenwire dev`.
//
// The page is loaded through a TCP proxy in front of the gateway, so a test can cut the
// connection as a network failure would (TCP reset) and refuse reconnects for a while.
// Screenshots go to <repo>/test-artifacts/.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { CHROMIUM, launchChromium } from '../helpers/browser.mjs';

import { renderMarkdown } from '../../sdk/markdown.js';
import { ARTIFACTS_DIR, expectedAnswer, startDev, startProxy, waitFor } from '../helpers/stack.mjs';


let dev;
let proxy;
let browser;

async function openPage({ viewport = { width: 1100, height: 800 }, mobile = false } = {}) {
  const context = await browser.newContext(
    mobile
      ? { viewport, deviceScaleFactor: 2, isMobile: true, hasTouch: true }
      : { viewport },
  );
  const page = await context.newPage();
  const log = { errors: [], dialogs: [], sent: [] };
  page.on('pageerror', (err) => log.errors.push(String(err)));
  page.on('console', (msg) => {
    if (msg.type() === 'error') log.errors.push(msg.text());
  });
  page.on('dialog', (dialog) => {
    log.dialogs.push(dialog.message());
    dialog.dismiss().catch(() => {});
  });
  page.on('websocket', (ws) => {
    ws.on('framesent', ({ payload }) => {
      try {
        log.sent.push(JSON.parse(String(payload)));
      } catch {
        // not JSON: not ours
      }
    });
  });
  await page.goto(proxy.url);
  await page.waitForSelector('[data-testid=connection-status][data-state=open]');
  return { page, context, log };
}

async function ask(page, text) {
  const before = await page.locator('[data-testid=answer]').count();
  await page.fill('[data-testid=question]', text);
  await page.press('[data-testid=question]', 'Enter');
  await page.waitForFunction((n) => document.querySelectorAll('[data-testid=answer]').length > n, before);
  return before; // the index of the new turn
}

/** Wait until turn `index` has ended (state done/stopped/error) and return what it shows. */
async function finished(page, index, timeout = 45000) {
  await page.waitForFunction(
    (i) => ['done', 'stopped', 'error'].includes(document.querySelectorAll('[data-testid=answer]')[i]?.dataset.state),
    index,
    { timeout },
  );
  return shown(page, index);
}

function shown(page, index) {
  return page.evaluate((i) => {
    const turn = document.querySelectorAll('[data-testid=turn]')[i];
    const answer = turn.querySelector('[data-testid=answer]');
    return {
      state: answer.dataset.state,
      html: answer.innerHTML,
      text: answer.innerText,
      status: turn.querySelector('[data-testid=request-status]').textContent,
      id: turn.dataset.requestId,
    };
  }, index);
}

/** The HTML `expected` renders to, as the browser serialises it. */
function serialised(page, markdown) {
  return page.evaluate((html) => {
    const t = document.createElement('template');
    t.innerHTML = html;
    return t.innerHTML;
  }, renderMarkdown(markdown));
}

/** What a reader sees of a Markdown answer: the text without markup, whitespace folded. */
function visible(markdown) {
  return fold(markdown.replace(/\*\*/g, '').replace(/^- /gm, ''));
}

function fold(text) {
  return text.replace(/\s+/g, ' ').trim();
}

/** Text lengths of answer `index` as the page showed them, recorded by a MutationObserver. */
async function recordLengths(page) {
  await page.evaluate(() => {
    window.__lengths = [];
    new MutationObserver(() => {
      const answers = document.querySelectorAll('[data-testid=answer]');
      const last = answers[answers.length - 1];
      if (last) window.__lengths.push(last.textContent.length);
    }).observe(document.getElementById('transcript'), { subtree: true, childList: true, characterData: true });
  });
}

async function snap(page, name) {
  await page.screenshot({ path: join(ARTIFACTS_DIR, `browser-${name}.png`), fullPage: true });
}

describe('web chat page in Chromium', { timeout: 170000 }, () => {
  before(async () => {
    assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install -y chromium`);
    mkdirSync(ARTIFACTS_DIR, { recursive: true });
    proxy = await startProxy(() => dev.port);
    dev = await startDev({ extraOrigins: [proxy.origin] });
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await proxy?.close();
    await dev?.stop();
  });

  test('a question gets the full answer, streamed, rendered as Markdown', async () => {
    const { page, context, log } = await openPage();
    await recordLengths(page);
    const query = 'What is tokenwire?';
    const i = await ask(page, query);
    const got = await finished(page, i);
    const expected = expectedAnswer(query);
    assert.equal(got.state, 'done', got.status);
    assert.equal(fold(got.text), visible(expected));
    assert.equal(got.html, await serialised(page, expected));
    assert.equal(await page.locator('[data-testid=answer] >> nth=0 >> strong').count(), 1);
    assert.equal(await page.locator('[data-testid=answer] >> nth=0 >> li').count(), 1);
    // Typewriter: the answer appeared on screen in many steps, not at once. (Its length may
    // dip by a few characters when a `**` pair closes and becomes bold.)
    const lengths = await page.evaluate(() => window.__lengths);
    const steps = lengths.filter((n, k) => n > 0 && n !== lengths[k - 1]);
    assert.ok(steps.length >= 5, `answer shown in ${steps.length} steps`);
    assert.ok(lengths.filter((n) => n > 0)[0] < got.text.length / 2, 'the first text shown was a small part');
    assert.equal(await page.isDisabled('[data-testid=stop]'), true);
    assert.deepEqual(log.errors, []);
    await snap(page, 'answer');
    await context.close();
  });

  test('stop mid-answer keeps what came and says stopped', async () => {
    const { page, context } = await openPage();
    const query = '/slow tell me a long story';
    const i = await ask(page, query);
    await page.waitForFunction((k) => document.querySelectorAll('[data-testid=answer]')[k].textContent.length > 10, i);
    assert.equal(await page.isDisabled('[data-testid=stop]'), false);
    await page.click('[data-testid=stop]');
    const got = await finished(page, i);
    assert.equal(got.state, 'stopped');
    assert.equal(got.status, 'Stopped');
    const request = await page.evaluate((id) => {
      const turn = window.__tokenwire.page.turns.find((t) => t.record.id === id);
      return { text: turn.request.text, stopped: turn.request.end?.stopped };
    }, got.id);
    assert.equal(request.stopped, true);
    const full = expectedAnswer(query);
    assert.ok(request.text.length > 0 && request.text.length < full.length, 'stopped part-way');
    assert.ok(full.startsWith(request.text));
    assert.equal(got.html, await serialised(page, request.text));
    await snap(page, 'stopped');
    await context.close();
  });

  test('a dropped connection mid-answer reconnects, resumes, and the answer completes once', async () => {
    const { page, context, log } = await openPage();
    const query = '/slow survive a network failure';
    const i = await ask(page, query);
    await page.waitForFunction((k) => document.querySelectorAll('[data-testid=answer]')[k].textContent.length > 10, i);
    const cut = proxy.cut({ refuseMs: 1500 }); // TCP reset, then reconnects are refused a while
    assert.ok(cut >= 1, 'the WebSocket went through the proxy');
    await page.waitForSelector('[data-testid=connection-status][data-state=reconnecting]');
    await page.waitForSelector('[data-testid=request-status][data-kind=waiting]');
    await snap(page, 'reconnecting');
    await page.waitForSelector('[data-testid=connection-status][data-state=open]', { timeout: 20000 });
    const got = await finished(page, i);
    const expected = expectedAnswer(query);
    assert.equal(got.state, 'done', got.status);
    assert.equal(fold(got.text), visible(expected), 'no text lost or repeated');
    assert.equal(got.html, await serialised(page, expected));
    const resumes = log.sent.filter((f) => f.type === 'resume');
    assert.equal(resumes.length, 1, JSON.stringify(resumes));
    assert.equal(resumes[0].id, got.id);
    assert.ok(resumes[0].after > 2, `resumed after seq ${resumes[0].after}`);
    assert.equal(log.sent.filter((f) => f.type === 'chat').length, 1, 'asked once');
    await snap(page, 'resumed');
    await context.close();
  });

  test('a reload mid-answer picks the answer up again', async () => {
    const { page, context } = await openPage();
    const query = '/slow keep going after a reload';
    const i = await ask(page, query);
    await page.waitForFunction((k) => document.querySelectorAll('[data-testid=answer]')[k].textContent.length > 10, i);
    await page.reload();
    await page.waitForSelector('[data-testid=connection-status][data-state=open]');
    assert.equal(await page.locator('[data-testid=turn]').count(), 1, 'the transcript came back');
    const got = await finished(page, 0);
    const expected = expectedAnswer(query);
    assert.equal(got.state, 'done', got.status);
    assert.equal(got.html, await serialised(page, expected));
    await context.close();
  });

  test('a hostile answer is shown as text and never runs', async () => {
    const { page, context, log } = await openPage();
    const query = '/hostile say something nasty';
    const i = await ask(page, query);
    const got = await finished(page, i);
    const expected = expectedAnswer(query);
    assert.match(expected, /<script>alert\(1\)<\/script>/);
    assert.equal(got.state, 'done');
    assert.equal(got.html, await serialised(page, expected));
    assert.ok(got.text.includes('<script>alert(1)</script>'), 'the markup is visible as text');
    assert.ok(got.text.includes('onerror=alert(1)>'));
    const counts = await page.evaluate(() => ({
      script: document.querySelectorAll('main script').length,
      img: document.querySelectorAll('main img').length,
      handlers: [...document.querySelectorAll('main *')].filter((el) => [...el.attributes].some((a) => a.name.startsWith('on'))).length,
    }));
    assert.deepEqual(counts, { script: 0, img: 0, handlers: 0 });
    await page.waitForTimeout(300); // an injected onerror would fire by now
    assert.deepEqual(log.dialogs, [], 'no alert() ran');
    await snap(page, 'hostile');
    await context.close();
  });

  test('agent thoughts and workflow steps are collapsible; the conversation continues; New chat starts over', async () => {
    const { page, context, log } = await openPage();
    const a = await ask(page, '/agent look something up');
    await finished(page, a);
    const thoughts = page.locator('[data-testid=thoughts]').nth(a);
    assert.equal(await thoughts.isVisible(), true);
    assert.equal(await thoughts.evaluate((el) => el.open), false, 'collapsed at first');
    await thoughts.locator('summary').click();
    assert.equal(await thoughts.evaluate((el) => el.open), true);
    assert.match(await thoughts.innerText(), /Tool: web_search/);
    assert.match(await thoughts.innerText(), /Observation: .*3 results found/);
    assert.equal(fold(await page.locator('[data-testid=answer]').nth(a).innerText()), visible(expectedAnswer('/agent look something up')));

    const c = await ask(page, '/chatflow run the workflow');
    await finished(page, c);
    const workflow = page.locator('[data-testid=workflow]').nth(c);
    assert.equal(await workflow.evaluate((el) => el.open), false);
    await workflow.locator('summary').click();
    const steps = await workflow.innerText();
    assert.match(steps, /Start: succeeded/);
    assert.match(steps, /LLM: succeeded/);
    assert.match(steps, /Workflow: succeeded/);
    await snap(page, 'agent-workflow');

    const chats = log.sent.filter((f) => f.type === 'chat');
    assert.equal(chats.length, 2);
    assert.equal(chats[0].conversation_id, undefined);
    const firstConversation = await page.evaluate(() => window.__tokenwire.page.turns[0].request.conversationId);
    assert.match(firstConversation, /^[0-9a-f-]{36}$/);
    assert.equal(chats[1].conversation_id, firstConversation, 'the second turn continues the conversation');

    await page.click('[data-testid=new-conversation]');
    assert.equal(await page.locator('[data-testid=turn]').count(), 0);
    const n = await ask(page, 'A fresh start');
    await finished(page, n);
    const third = log.sent.filter((f) => f.type === 'chat')[2];
    assert.equal(third.conversation_id, undefined, 'New chat starts a new conversation');
    await context.close();
  });

  test('queued status shows while Dify is rate limited, then the answer arrives', async () => {
    const { page, context } = await openPage();
    const query = `Rate limited once ${Date.now()}`;
    await page.evaluate((q) => {
      window.__tokenwire.page.ask(q, { inputs: { tw_sim: { fault: '429', fault_times: 1 } } });
    }, query);
    const status = await page.waitForSelector('[data-testid=request-status][data-kind=queued]');
    assert.match(await status.textContent(), /^Queued \(.+\) — retrying in \d+ s, attempt \d+/);
    await snap(page, 'queued');
    const got = await finished(page, 0);
    assert.equal(got.state, 'done', got.status);
    assert.equal(fold(got.text), visible(expectedAnswer(query, { fault: '429', fault_times: 1 })));
    await context.close();
  });

  test('usable at phone width', async () => {
    const { page, context, log } = await openPage({ viewport: { width: 375, height: 720 }, mobile: true });
    const i = await ask(page, 'Hello from a phone');
    await finished(page, i);
    const layout = await page.evaluate(() => {
      const rect = (sel) => document.querySelector(sel).getBoundingClientRect();
      return {
        overflow: document.documentElement.scrollWidth - window.innerWidth,
        send: rect('[data-testid=send]'),
        stop: rect('[data-testid=stop]'),
        input: rect('[data-testid=question]'),
        answer: rect('[data-testid=answer]'),
      };
    });
    assert.ok(layout.overflow <= 0, `page scrolls sideways by ${layout.overflow}px`);
    for (const name of ['send', 'stop', 'input', 'answer']) {
      const r = layout[name];
      assert.ok(r.left >= 0 && r.right <= 375 && r.width > 0, `${name} is off screen: ${JSON.stringify(r)}`);
    }
    assert.ok(layout.input.width >= 150, 'the input is wide enough to type in');
    assert.deepEqual(log.errors, []);
    await snap(page, 'phone');
    await context.close();
  });
});
