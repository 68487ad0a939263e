// tokenwire's embeddable chat widget: one classic <script> tag puts a chat bubble on any page
// and opens the gateway's own client (`/?embed=1`) in a panel. Docs: docs/widget.md.
//
//   <script src="https://chat.example.com/widget.js" data-app="support"
//           data-token-function="getChatToken" data-title="Help" async></script>
//
// Why an iframe of the gateway's page and not Shadow DOM alone: the client then runs on the
// gateway's origin with its own CSP, storage and CSS, so nothing the host page does (styles,
// globals, a broken polyfill) reaches it, and the host needs no connect-src for the gateway.
// The bubble and the frame sit in a shadow root whose !important rules beat the host's.
//
// The JWT: the frame asks for it by postMessage; this script answers only its own frame at the
// gateway's origin, and posts the token to that origin only (a redirected frame never sees it).
(() => {
  const script = document.currentScript;
  if (!script || script.dataset.tokenwireLoaded) return;
  script.dataset.tokenwireLoaded = '1';
  const d = script.dataset;
  const base = new URL(d.gateway || './', d.gateway ? location.href : script.src);
  const gatewayOrigin = base.origin;
  const color = (value, fallback) => (value && CSS.supports('color', value) ? value : fallback);
  const accent = color(d.color, '#2f6fec');
  const ink = color(d.textColor, '#ffffff');
  const title = d.title || 'Chat';
  const tokenFn = d.tokenFunction;
  const tokenUrl = d.tokenUrl;

  async function token() {
    if (tokenFn) {
      const fn = tokenFn.split('.').reduce((o, k) => (o == null ? o : o[k]), window);
      if (typeof fn !== 'function') throw new Error(`data-token-function: no function ${tokenFn}`);
      return String(await fn());
    }
    const response = await fetch(new URL(tokenUrl, location.href), { credentials: 'include' });
    if (!response.ok) throw new Error(`data-token-url: HTTP ${response.status}`);
    const body = (await response.text()).trim();
    return body.startsWith('{') ? String(JSON.parse(body).token) : body;
  }

  const src = new URL('./', base);
  src.searchParams.set('embed', '1');
  src.searchParams.set('parent', location.origin);
  src.searchParams.set('title', title);
  if (d.app) src.searchParams.set('app', d.app);
  if (d.color) src.searchParams.set('accent', accent);
  if (tokenFn || tokenUrl) src.searchParams.set('token', 'parent');

  const host = document.createElement('div');
  host.dataset.tokenwireWidget = '';
  const root = host.attachShadow({ mode: 'open' });
  const sheet = new CSSStyleSheet();
  // The host's selectors never match inside the shadow tree; what it sets on the host element
  // itself (inherited colour, font) is undone by :host's important rules, which win there.
  sheet.replaceSync(`
    :host { all: initial !important; position: fixed !important; z-index: 2147483000 !important;
      inset: auto 20px 20px auto !important; display: block !important; }
    .bubble { all: initial !important; box-sizing: border-box !important; width: 56px !important; height: 56px !important;
      border-radius: 50% !important; background: ${accent} !important; color: ${ink} !important; cursor: pointer !important;
      display: grid !important; place-items: center !important; box-shadow: 0 6px 20px rgb(0 0 0 / .25) !important;
      font: 600 14px/1 system-ui, sans-serif !important; }
    .bubble:focus-visible { outline: 3px solid ${accent} !important; outline-offset: 3px !important; }
    .bubble svg { width: 28px !important; height: 28px !important; fill: currentColor !important; display: block !important; }
    .panel { all: initial !important; position: fixed !important; right: 20px !important; bottom: 88px !important;
      width: min(400px, calc(100vw - 40px)) !important; height: min(640px, calc(100vh - 112px)) !important;
      border: 0 !important; border-radius: 14px !important; background: none !important; display: block !important;
      box-shadow: 0 12px 40px rgb(0 0 0 / .3) !important; color-scheme: normal !important; }
    .panel[hidden] { display: none !important; }
    @media (max-width: 520px) {
      .panel { inset: 0 !important; width: 100vw !important; height: 100dvh !important; border-radius: 0 !important; }
    }`);
  root.adoptedStyleSheets = [sheet];

  const bubble = document.createElement('button');
  bubble.className = 'bubble';
  bubble.type = 'button';
  bubble.setAttribute('aria-label', `Open ${title}`);
  bubble.setAttribute('aria-expanded', 'false');
  bubble.dataset.testid = 'widget-bubble';
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  const path = document.createElementNS('http://www.w3.org/2000/svg', 'path');
  path.setAttribute('d', 'M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2z');
  svg.append(path);
  bubble.append(svg);

  const panel = document.createElement('iframe');
  panel.className = 'panel';
  panel.title = title;
  panel.hidden = true;
  panel.dataset.testid = 'widget-panel';
  panel.setAttribute('allow', 'microphone; clipboard-write');
  root.append(panel, bubble);

  function setOpen(open) {
    if (open && !panel.src) panel.src = src.href; // the client loads on first open
    panel.hidden = !open;
    bubble.setAttribute('aria-expanded', String(open));
    bubble.setAttribute('aria-label', `${open ? 'Close' : 'Open'} ${title}`);
    if (open) panel.focus();
  }
  bubble.addEventListener('click', () => setOpen(panel.hidden));

  window.addEventListener('message', async (event) => {
    if (event.source !== panel.contentWindow || event.origin !== gatewayOrigin) return;
    const msg = event.data;
    if (!msg || typeof msg !== 'object' || typeof msg.tokenwire !== 'string') return;
    if (msg.tokenwire === 'close') {
      setOpen(false);
      bubble.focus();
    } else if (msg.tokenwire === 'token?' && (tokenFn || tokenUrl)) {
      const reply = { tokenwire: 'token', nonce: msg.nonce };
      try {
        reply.token = await token();
      } catch (error) {
        reply.error = String(error?.message ?? error);
      }
      panel.contentWindow?.postMessage(reply, gatewayOrigin);
    }
  });

  const mount = () => {
    document.body.append(host);
    if (d.open === 'true' || d.open === '') setOpen(true);
  };
  if (document.body) mount();
  else document.addEventListener('DOMContentLoaded', mount, { once: true });
  // For the host page: open, close, or remove the widget.
  window.tokenwireWidget = { open: () => setOpen(true), close: () => setOpen(false), element: host };
})();
