// A small, safe Markdown renderer for chat answers: Markdown in, HTML out, no dependencies.
//
// Safety rule: every character of the source reaches the output through `escapeHtml`, so
// text can never become markup. The only tags written are the ones below, built here, with
// two attributes: `href` (only http: and https: URLs, escaped) and a `class` on code blocks
// (letters, digits, `-` and `_` only). An answer that contains `<script>` or `onerror=` is
// shown as text.
//
// Subset: paragraphs (a single newline is a line break, as chat answers expect), headings,
// block quotes, `-`/`*`/`+` and numbered lists (one level), fenced code blocks, horizontal
// rules, and inline `code`, **bold**, *italic*, [links](https://...) and bare https:// URLs.
// It is meant to be re-run on a growing answer while it streams: an unclosed code fence is
// shown as code so far, an unclosed `**` as text.

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

/** Escape text for HTML element content and double-quoted attribute values. */
export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

/** Whether `url` may be a link target: absolute http(s) only, no whitespace or controls. */
export function isSafeUrl(url) {
  // eslint-disable-next-line no-control-regex
  return /^https?:\/\/[^\s\u0000-\u001f\u007f]+$/i.test(url);
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([A-Za-z0-9_+-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const BULLET = /^ {0,3}([-*+])\s+(.*)$/;
const ORDERED = /^ {0,3}(\d{1,9})[.)]\s+(.*)$/;

function isBlockStart(line) {
  return (
    FENCE.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    BULLET.test(line) ||
    ORDERED.test(line)
  );
}

/** Render Markdown `source` to an HTML string that is safe to assign to `innerHTML`. */
export function renderMarkdown(source) {
  const lines = String(source ?? '')
    .replace(/\r\n?/g, '\n')
    .split('\n');
  const blocks = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (line.trim() === '') {
      i += 1;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      const marker = fence[1];
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(marker)) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (or past the end while it streams)
      const lang = fence[2] ? ` class="language-${escapeHtml(fence[2])}"` : '';
      blocks.push(`<pre><code${lang}>${escapeHtml(body.join('\n'))}</code></pre>`);
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      // h1/h2 would shout inside a chat bubble: levels start at h3.
      const level = Math.min(6, heading[1].length + 2);
      blocks.push(`<h${level}>${renderInline(heading[2])}</h${level}>`);
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      blocks.push('<hr>');
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && QUOTE.test(lines[i])) {
        body.push(QUOTE.exec(lines[i])[1]);
        i += 1;
      }
      blocks.push(`<blockquote>${renderMarkdown(body.join('\n'))}</blockquote>`);
      continue;
    }
    if (BULLET.test(line) || ORDERED.test(line)) {
      const ordered = !BULLET.test(line);
      const pattern = ordered ? ORDERED : BULLET;
      const start = ordered ? Number(ORDERED.exec(line)[1]) : 1;
      const items = [];
      while (i < lines.length) {
        const item = pattern.exec(lines[i]);
        if (item) {
          items.push([item[2]]);
        } else if (lines[i].trim() !== '' && !isBlockStart(lines[i])) {
          items[items.length - 1].push(lines[i].trim()); // a continuation line
        } else {
          break;
        }
        i += 1;
      }
      const tag = ordered ? 'ol' : 'ul';
      const attrs = ordered && start !== 1 ? ` start="${start}"` : '';
      const body = items.map((parts) => `<li>${renderLines(parts)}</li>`).join('');
      blocks.push(`<${tag}${attrs}>${body}</${tag}>`);
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() !== '' && (para.length === 0 || !isBlockStart(lines[i]))) {
      para.push(lines[i].trim());
      i += 1;
    }
    blocks.push(`<p>${renderLines(para)}</p>`);
  }
  return blocks.join('\n');
}

function renderLines(lines) {
  return lines.map((line) => renderInline(line)).join('<br>\n');
}

// One pass over the raw text; each alternative is one inline construct:
//   1,2 code span   3,4 link   5 bare URL   6,7 strong   8,9 emphasis
const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,
    /\[([^\]\n]+)\]\(\s*([^)\s]+)\s*\)/.source,
    /(https?:\/\/[^\s<>()[\]]*[^\s<>()[\].,;:!?'"*_])/.source,
    /(\*\*|(?<![A-Za-z0-9])__)(?=\S)([\s\S]*?\S)\6/.source,
    /(\*|(?<![A-Za-z0-9])_)(?=[^\s*_])([\s\S]*?[^\s*_])\8(?![A-Za-z0-9])/.source,
  ].join('|'),
  'g',
);

/** Render inline Markdown of one line (or one paragraph's text) to safe HTML. */
export function renderInline(text, allowLinks = true) {
  let out = '';
  let last = 0;
  const source = String(text);
  const re = new RegExp(INLINE.source, 'g');
  let m;
  while ((m = re.exec(source)) !== null) {
    let html = null;
    if (m[1] !== undefined) {
      html = `<code>${escapeHtml(m[2].replace(/^ (.*) $/, '$1'))}</code>`;
    } else if (m[3] !== undefined) {
      html =
        allowLinks && isSafeUrl(m[4])
          ? `<a href="${escapeHtml(m[4])}" rel="noopener noreferrer nofollow" target="_blank">${renderInline(m[3], false)}</a>`
          : null;
    } else if (m[5] !== undefined) {
      html = allowLinks
        ? `<a href="${escapeHtml(m[5])}" rel="noopener noreferrer nofollow" target="_blank">${escapeHtml(m[5])}</a>`
        : null;
    } else if (m[6] !== undefined) {
      html = `<strong>${renderInline(m[7], allowLinks)}</strong>`;
    } else if (m[8] !== undefined) {
      html = `<em>${renderInline(m[9], allowLinks)}</em>`;
    }
    if (html === null) {
      // Not a construct after all (e.g. a javascript: link): keep its first character as
      // text and scan on from the next one.
      re.lastIndex = m.index + 1;
      continue;
    }
    out += escapeHtml(source.slice(last, m.index)) + html;
    last = m.index + m[0].length;
  }
  return out + escapeHtml(source.slice(last));
}
