// The React hook (sdk/react.js) and the Vue composable (sdk/vue.js) in Debian's Chromium: two
// small apps bundled by esbuild, served by a site on another origin, each streaming answers
// from a real `tokenwire dev` over one SDK connection: an answer equal to the simulator's, a
// second question in the same conversation, and Stop.

import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { build } from 'esbuild';

import { collectErrors, launchChromium, startSite } from '../helpers/browser.mjs';
import { WEB_DIR, expectedAnswer, startDev } from '../helpers/stack.mjs';

const PAGES = join(WEB_DIR, 'test', 'browser', 'pages');

async function bundle(entry) {
  const result = await build({
    entryPoints: [join(PAGES, entry)],
    bundle: true,
    write: false,
    format: 'esm',
    jsx: 'automatic',
    logLevel: 'silent',
    define: {
      'process.env.NODE_ENV': '"production"',
      __VUE_OPTIONS_API__: 'false',
      __VUE_PROD_DEVTOOLS__: 'false',
      __VUE_PROD_HYDRATION_MISMATCH_DETAILS__: 'false',
    },
  });
  return result.outputFiles[0].text;
}

const html = (script) => `<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">
<script type="module" src="/${script}"></script></head><body><div id="root"></div></body></html>`;

let dev;
let site;
let browser;

describe('React hook and Vue composable (Chromium, tokenwire dev)', { timeout: 240000 }, () => {
  before(async () => {
    const [react, vue] = await Promise.all([bundle('react-app.jsx'), bundle('vue-app.js')]);
    site = await startSite({ '/react.html': html('react.js'), '/react.js': react, '/vue.html': html('vue.js'), '/vue.js': vue });
    // The apps open the WebSocket themselves, from the site's origin: the gateway must allow it.
    dev = await startDev({ extraOrigins: [site.origin] });
    browser = await launchChromium();
  });

  after(async () => {
    await browser?.close();
    await site?.close();
    await dev?.stop();
  });

  for (const framework of ['react', 'vue']) {
    test(`${framework}: streams answers, continues the conversation, stops`, async () => {
      const context = await browser.newContext();
      const page = await context.newPage();
      const errors = collectErrors(page);
      const user = `${framework}-${Date.now()}`;
      await page.goto(`${site.origin}/${framework}.html?ws=${encodeURIComponent(dev.wsUrl)}&user=${user}`);
      await page.waitForSelector('[data-testid=state]:text("open")');

      const query = `What does the ${framework} hook do?`;
      await page.fill('[data-testid=question]', query);
      await page.click('[data-testid=send]');
      // The answer grows in the DOM (re-rendered per delta) before it is done.
      await page.waitForFunction(() => {
        const m = document.querySelector('[data-testid=message]');
        return m?.dataset.status === 'answering' && m.querySelector('[data-testid=answer]').textContent.length > 0;
      });
      await page.waitForSelector('[data-testid=message][data-status=done]', { timeout: 45000 });
      assert.equal(await page.textContent('[data-testid=answer]'), expectedAnswer(query));

      await page.fill('[data-testid=question]', 'And a second question');
      await page.click('[data-testid=send]');
      await page.waitForFunction(() => document.querySelectorAll('[data-testid=message][data-status=done]').length === 2, null, { timeout: 45000 });
      const conversations = await page.locator('[data-testid=message]').evaluateAll((els) => els.map((e) => e.dataset.conversation));
      assert.ok(conversations[0], 'the first answer started a conversation');
      assert.equal(conversations[1], conversations[0], 'the second continues it');

      await page.click('[data-testid=new]');
      await page.fill('[data-testid=question]', '/slow an answer to stop');
      await page.click('[data-testid=send]');
      await page.waitForFunction(() => document.querySelector('[data-testid=answer]')?.textContent.length > 5);
      await page.click('[data-testid=stop]');
      await page.waitForSelector('[data-testid=message][data-status=stopped]', { timeout: 30000 });
      assert.equal(await page.locator('[data-testid=message]').count(), 1, 'New cleared the old messages');
      assert.notEqual(await page.getAttribute('[data-testid=message]', 'data-conversation'), conversations[0], 'New started another conversation');
      assert.deepEqual(errors, []);
      await context.close();
    });
  }
});
