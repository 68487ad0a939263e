// The answer renderer: Markdown subset in, safe HTML out.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { escapeHtml, isSafeUrl, renderMarkdown } from '../sdk/markdown.js';

const ALLOWED_TAGS = new Set(['p', 'br', 'strong', 'em', 'code', 'pre', 'ul', 'ol', 'li', 'a', 'h3', 'h4', 'h5', 'h6', 'blockquote', 'hr']);
const ALLOWED_ATTRS = new Set(['href', 'rel', 'target', 'class', 'start']);

/** Every tag and attribute in `html` is one the renderer may write; hrefs are http(s). */
function assertSafe(html) {
  const tag = /<\/?([a-zA-Z0-9]+)([^>]*)>/g;
  let m;
  while ((m = tag.exec(html)) !== null) {
    assert.ok(ALLOWED_TAGS.has(m[1]), `unexpected tag <${m[1]}> in ${html}`);
    const attrs = m[2].trim();
    if (!attrs) continue;
    for (const a of attrs.matchAll(/([a-zA-Z-]+)="([^"]*)"/g)) {
      assert.ok(ALLOWED_ATTRS.has(a[1]), `unexpected attribute ${a[1]} in ${html}`);
      if (a[1] === 'href') assert.match(a[2], /^https?:\/\//);
    }
    assert.equal(attrs.replace(/([a-zA-Z-]+)="([^"]*)"/g, '').trim(), '', `stray attribute text in ${m[0]}`);
  }
  // Text never holds a raw angle bracket or quote that could open markup.
  const text = html.replace(tag, '');
  assert.doesNotMatch(text, /[<>]/);
}

describe('renderMarkdown', () => {
  test('the simulator-style answer: paragraph, bold, list, CJK and emoji', () => {
    const html = renderMarkdown('Worker: signal café **latency** cache\n- latency socket\n\n世界 resume 🚀 gateway.');
    assert.equal(
      html,
      '<p>Worker: signal café <strong>latency</strong> cache</p>\n<ul><li>latency socket</li></ul>\n<p>世界 resume 🚀 gateway.</p>',
    );
  });

  test('inline code, emphasis, links and line breaks', () => {
    assert.equal(renderMarkdown('a *b* _c_ `x<y>` snake_case_name'), '<p>a <em>b</em> <em>c</em> <code>x&lt;y&gt;</code> snake_case_name</p>');
    assert.equal(
      renderMarkdown('[docs](https://example.com/a?b=1&c=2)'),
      '<p><a href="https://example.com/a?b=1&amp;c=2" rel="noopener noreferrer nofollow" target="_blank">docs</a></p>',
    );
    assert.equal(renderMarkdown('one\ntwo'), '<p>one<br>\ntwo</p>');
  });

  test('code blocks keep their text verbatim, escaped; an unclosed fence is code so far', () => {
    assert.equal(renderMarkdown('```html\n<b>"hi"</b>\n```\nafter'), '<pre><code class="language-html">&lt;b&gt;&quot;hi&quot;&lt;/b&gt;</code></pre>\n<p>after</p>');
    assert.equal(renderMarkdown('```\nstreaming **not bold**'), '<pre><code>streaming **not bold**</code></pre>');
  });

  test('ordered lists, quotes, headings and rules', () => {
    assert.equal(renderMarkdown('3. a\n4. b'), '<ol start="3"><li>a</li><li>b</li></ol>');
    assert.equal(renderMarkdown('> **q**'), '<blockquote><p><strong>q</strong></p></blockquote>');
    assert.equal(renderMarkdown('# Title'), '<h3>Title</h3>');
    assert.equal(renderMarkdown('---'), '<hr>');
  });

  test('hostile answers stay text', () => {
    const cases = [
      ' <scr' + 'ipt>alert(1)</script> <img src=x onerror=alert(1)>',
      '<a href="javascript:alert(1)">x</a>',
      '[click](javascript:alert(1))',
      '[click](JAVASCRIPT:alert(1))',
      '[click](data:text/html;base64,PHNjcmlwdD4=)',
      '[x](https://ok.example/"onmouseover="alert(1))',
      '**<svg onload=alert(1)>**',
      '`</code><script>alert(1)</script>`',
      '```"><img src=x onerror=alert(1)>\ncode\n```',
      'https://evil.example/<script>',
      '<!-- comment --><style>*{}</style><iframe src=//x>',
      '&lt;script&gt; already escaped',
    ];
    for (const source of cases) {
      const html = renderMarkdown(source);
      assertSafe(html);
      assert.doesNotMatch(html, /<script|<img|<svg|<iframe|<style|javascript:"|href="javascript|href="data/i, html);
    }
    assert.equal(renderMarkdown('[click](javascript:alert(1))'), '<p>[click](javascript:alert(1))</p>');
    assert.equal(renderMarkdown('&lt;'), '<p>&amp;lt;</p>');
  });

  test('random input of markup characters never yields markup', () => {
    const alphabet = ['<', '>', '"', "'", '&', '*', '_', '`', '[', ']', '(', ')', 'a', ' ', '\n', '#', '-', '1.', 'http://x', 'https://y', 'javascript:', 'on', '=', '/', 'script', 'img', '~~~', '```', '>'];
    let seed = 42;
    const rand = () => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed / 0x7fffffff;
    };
    for (let i = 0; i < 3000; i += 1) {
      const n = 1 + Math.floor(rand() * 30);
      let source = '';
      for (let j = 0; j < n; j += 1) source += alphabet[Math.floor(rand() * alphabet.length)];
      assertSafe(renderMarkdown(source));
    }
  });

  test('every prefix of a streaming answer renders safely', () => {
    const answer = 'Hi **there** `a<b` [l](https://x.y/z) <scr' + 'ipt>alert(1)</script>\n- item\n\n```js\nx < 1\n```';
    for (let i = 0; i <= answer.length; i += 1) assertSafe(renderMarkdown(answer.slice(0, i)));
  });
});

test('escapeHtml and isSafeUrl', () => {
  assert.equal(escapeHtml(`<a href="x" onclick='y'>&</a>`), '&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;');
  assert.ok(isSafeUrl('https://example.com/x'));
  assert.ok(isSafeUrl('HTTP://example.com'));
  assert.ok(!isSafeUrl('javascript:alert(1)'));
  assert.ok(!isSafeUrl('//example.com'));
  assert.ok(!isSafeUrl('https://exa mple.com'));
});
