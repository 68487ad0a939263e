// Ask one question in the web page, as a person would, and print what the page shows.
//
//   node web/test/helpers/ask-page.mjs URL QUESTION EXPECTED_ANSWER
//
// Opens URL in Debian's Chromium (playwright-core; never a downloaded browser), waits for the
// connection to open, types QUESTION, presses Enter and waits for the answer to end. Prints one
// JSON object: the answer's final state, its HTML, the HTML that EXPECTED_ANSWER renders to in
// the same page, and any page errors. Used by tests/install/, which installs tokenwire the ways
// users do and checks the page from there. Exits non-zero if the page never answers.

import { launchChromium } from './browser.mjs';

import { renderMarkdown } from '../../sdk/markdown.js';

const [url, question, expected] = process.argv.slice(2);
if (!url || question === undefined || expected === undefined) {
  console.error('usage: ask-page.mjs URL QUESTION EXPECTED_ANSWER');
  process.exit(2);
}

const browser = await launchChromium();
try {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(String(err)));
  page.on('console', (msg) => {
    if (msg.type() === 'error') errors.push(msg.text());
  });
  await page.goto(url);
  await page.waitForSelector('[data-testid=connection-status][data-state=open]', { timeout: 30000 });
  await page.fill('[data-testid=question]', question);
  await page.press('[data-testid=question]', 'Enter');
  await page.waitForFunction(
    () => ['done', 'stopped', 'error'].includes(document.querySelector('[data-testid=answer]')?.dataset.state),
    undefined,
    { timeout: 60000 },
  );
  const shown = await page.evaluate((html) => {
    const answer = document.querySelector('[data-testid=answer]');
    const t = document.createElement('template');
    t.innerHTML = html;
    return { state: answer.dataset.state, html: answer.innerHTML, expected_html: t.innerHTML };
  }, renderMarkdown(expected));
  console.log(JSON.stringify({ ...shown, errors }));
} finally {
  await browser.close();
}
