// The embeddable widget (web/widget.js) on a host site of another origin, in Debian's Chromium,
// against real processes with JWT auth (nats-server, simulator, worker, one gateway): the host
// page's own function gives the JWT, its aggressive CSS does not reach the widget, and the
// answer is the simulator's. Screenshots (desktop and phone, light and dark) go to
// docs/screenshots/widget-*.png and test-artifacts/.

import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { collectErrors, hs256, launchChromium, startSite } from '../helpers/browser.mjs';
import { ARTIFACTS_DIR, REPO_DIR, expectedAnswer, startStack, waitFor } from '../helpers/stack.mjs';

const SECRET = `widget-secret-${randomUUID()}`;
const DOCS_SHOTS = join(REPO_DIR, 'docs', 'screenshots');
// What a careless host site does to every element it can reach.
const HOSTILE_CSS = `
  * { color: red !important; font-size: 40px !important; font-family: serif !important; }
  div, button, iframe { border: 6px dashed red !important; background: yellow !important; }
  iframe { width: 10px !important; height: 10px !important; }
`;

let stack;
let site;
let browser;
let gateway;
const issued = [];

function hostPage({ attrs, csp = true }) {
  const policy = `default-src 'self'; script-src 'self' ${gateway}; frame-src ${gateway}; style-src 'self' 'unsafe-inline'`;
  return `<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
${csp ? `<meta http-equiv="Content-Security-Policy" content="${policy}">` : ''}
<title>A shop</title><style>${HOSTILE_CSS}</style>
<script src="/host.js"></script>
<script src="${gateway}/widget.js" ${attrs} async></script>
</head><body><h1>Our shop</h1><p>Products, prices, and a chat bubble in the corner.</p></body></html>`;
}

describe('the widget on another origin (Chromium, JWT gateway)', { timeout: 240000 }, () => {
  before(async () => {
    stack = await startStack({ gatewayEnv: { TOKENWIRE_AUTH: 'jwt', TOKENWIRE_ALLOW_INSECURE: '0', TOKENWIRE_JWT_SECRET: SECRET } });
    gateway = stack.wsUrl.replace(/^ws/, 'http').replace(/\/v1\/ws$/, '');
    site = await startSite({
      // The host's backend: who is signed in here decides the token's `sub`.
      '/token': (req) => {
        const sub = new URL(req.url, 'http://x').searchParams.get('sub') ?? 'shop-user';
        issued.push(sub);
        return { body: hs256(SECRET, sub), type: 'text/plain' };
      },
      '/favicon.ico': { body: '', type: 'image/x-icon' },
      '/host.js': `window.shop = { chatToken: async () => (await fetch('/token?sub=' + (window.shopUser || 'shop-user'))).text() };`,
      '/fn.html': () => hostPage({ attrs: `data-token-function="shop.chatToken" data-title="Shop help" data-color="#0a7d4f"` }),
      '/spoof.html': () => `<!doctype html><iframe src="${gateway}/?embed=1&token=parent&parent=${encodeURIComponent('http://127.0.0.1:9')}" width="400" height="500"></iframe>`,
      '/url.html': () => hostPage({ attrs: `data-token-url="/token?sub=url-user" data-title="Shop help" data-color="#7b3fe4" data-open="true"` }),
    });
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await site?.close();
    await stack?.stop();
  });

  test('a bubble opens the client; it chats with the host function\'s JWT; the host CSS stays out', async () => {
    const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
    const sub = `widget-${randomUUID().slice(0, 8)}`;
    await context.addInitScript((user) => { window.shopUser = user; }, sub);
    const page = await context.newPage();
    const errors = collectErrors(page);
    await page.goto(`${site.origin}/fn.html`);
    const bubble = page.locator('[data-testid=widget-bubble]');
    await bubble.waitFor();
    assert.equal(await page.isHidden('[data-testid=widget-panel]'), true, 'closed until asked');

    const bubbleStyle = await bubble.evaluate((b) => {
      const s = getComputedStyle(b);
      return { color: s.color, fontSize: s.fontSize, border: s.borderTopStyle, background: s.backgroundColor, width: s.width };
    });
    assert.deepEqual(bubbleStyle, { color: 'rgb(255, 255, 255)', fontSize: '14px', border: 'none', background: 'rgb(10, 125, 79)', width: '56px' });

    await bubble.press('Enter'); // the keyboard opens it too
    assert.equal(await bubble.getAttribute('aria-expanded'), 'true');
    const frame = await waitFor(() => page.frames().find((f) => f.url().includes('embed=1')), { what: 'the widget frame' });
    assert.equal(new URL(frame.url()).origin, gateway, 'the client runs on the gateway\'s origin');
    await frame.waitForSelector('[data-testid=connection-status][data-state=open]', { state: 'attached' });
    assert.equal(await frame.textContent('h1'), 'Shop help');
    const box = await page.locator('[data-testid=widget-panel]').boundingBox();
    assert.ok(box.width >= 380 && box.height >= 500, `the panel is ${box.width}×${box.height}, not the host's 10px`);

    const query = `Where is my parcel ${randomUUID().slice(0, 6)}?`;
    await frame.fill('[data-testid=question]', query);
    await frame.press('[data-testid=question]', 'Enter');
    await frame.waitForFunction(() => document.querySelector('[data-testid=answer]')?.dataset.state === 'done', null, { timeout: 45000 });
    const answer = await frame.evaluate(() => window.__tokenwire.page.turns[0].record.text);
    assert.equal(answer, expectedAnswer(query));

    const asked = (await (await fetch(`${stack.simUrl.replace(/\/v1$/, '')}/_sim/requests`)).json()).find((r) => r.query === query);
    assert.ok(asked, 'Dify was asked');
    assert.equal(asked.user, sub, 'the user is the sub of the host\'s token');
    assert.ok(issued.includes(sub), 'the token came from the host page\'s function');

    // Nothing of the host's CSS inside: the frame's own colours and sizes.
    const inside = await frame.evaluate(() => {
      const a = getComputedStyle(document.querySelector('[data-testid=answer]'));
      const q = getComputedStyle(document.querySelector('[data-testid=question]'));
      return { color: a.color, fontSize: a.fontSize, family: a.fontFamily, qBorder: q.borderTopStyle };
    });
    assert.notEqual(inside.color, 'rgb(255, 0, 0)');
    assert.notEqual(inside.fontSize, '40px');
    assert.doesNotMatch(inside.family, /^serif$/);
    assert.notEqual(inside.qBorder, 'dashed');
    // The host's accent colour reached the client.
    assert.equal(await frame.evaluate(() => getComputedStyle(document.documentElement).getPropertyValue('--accent').trim()), '#0a7d4f');

    // Escape in the panel closes it and gives the focus back to the bubble.
    await frame.focus('[data-testid=question]');
    await page.keyboard.press('Escape');
    await page.locator('[data-testid=widget-panel]').waitFor({ state: 'hidden' });
    assert.equal(await bubble.evaluate((b) => b.getRootNode().activeElement === b), true);
    assert.deepEqual(errors, []);
    await context.close();
  });

  test('data-token-url and data-open; a frame whose parent lies about its origin gets no token', async () => {
    const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
    const page = await context.newPage();
    await page.goto(`${site.origin}/url.html`);
    const frame = await waitFor(() => page.frames().find((f) => f.url().includes('embed=1')), { what: 'the widget frame' });
    await frame.waitForSelector('[data-testid=connection-status][data-state=open]', { state: 'attached' });
    assert.ok(issued.includes('url-user'), 'the token came from data-token-url');

    // A page framing the client with someone else's origin as `parent`: the frame trusts what
    // the browser says embeds it, asks nobody for a token, and the JWT gateway refuses it.
    const before = issued.length;
    await page.goto(`${site.origin}/spoof.html`);
    const spoofed = await waitFor(() => page.frames().find((f) => f.url().includes('embed=1')), { what: 'the framed client' });
    await spoofed.waitForSelector('[data-testid=connection-status][data-state=closed]', { state: 'attached', timeout: 20000 });
    assert.equal(issued.length, before, 'no token was asked for');
    await context.close();
  });

  test('screenshots: desktop and phone, light and dark', async () => {
    mkdirSync(DOCS_SHOTS, { recursive: true });
    mkdirSync(ARTIFACTS_DIR, { recursive: true });
    for (const colorScheme of ['light', 'dark']) {
      for (const [name, viewport, mobile] of [['desktop', { width: 1100, height: 760 }, false], ['phone', { width: 390, height: 780 }, true]]) {
        const context = await browser.newContext({ viewport, colorScheme, ...(mobile ? { deviceScaleFactor: 2, isMobile: true, hasTouch: true } : {}) });
        const page = await context.newPage();
        await page.goto(`${site.origin}/url.html`);
        const frame = await waitFor(() => page.frames().find((f) => f.url().includes('embed=1')), { what: 'the widget frame' });
        await frame.waitForSelector('[data-testid=connection-status][data-state=open]', { state: 'attached' });
        await frame.fill('[data-testid=question]', 'Show me **Markdown** with a list');
        await frame.press('[data-testid=question]', 'Enter');
        await frame.waitForFunction(() => document.querySelector('[data-testid=answer]')?.dataset.state === 'done', null, { timeout: 45000 });
        const file = `widget-${name}-${colorScheme}.png`;
        await page.screenshot({ path: join(DOCS_SHOTS, file) });
        await page.screenshot({ path: join(ARTIFACTS_DIR, file) });
        if (mobile) {
          const box = await page.locator('[data-testid=widget-panel]').boundingBox();
          assert.equal(Math.round(box.width), viewport.width, 'on a phone the panel takes the screen');
        }
        await context.close();
      }
    }
  });
});
