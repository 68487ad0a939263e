// The web chat page, on top of the browser SDK (sdk/tokenwire.js).
//
// What it keeps: the transcript and the conversation id in sessionStorage (so a reload shows
// the same chat), the user id in localStorage (TOKENWIRE_AUTH=none uses it as the user), and
// an optional token from the URL fragment (`#token=<jwt>`, for TOKENWIRE_AUTH=jwt). Requests
// still running at a reload are resumed by the SDK; the page re-attaches them to their turn.
//
// Answers are rendered with sdk/markdown.js, which escapes all text: nothing an answer holds
// becomes markup. Agent thoughts and workflow steps go into collapsed <details>, as text.

import { Connection } from './sdk/tokenwire.js';
import { renderMarkdown } from './sdk/markdown.js';

const PAGE_KEY = 'tokenwire.page.v1';
const USER_KEY = 'tokenwire.user';
const TOKEN_KEY = 'tokenwire.token';
const FINAL = new Set(['done', 'stopped', 'error']);

const $ = (id) => document.getElementById(id);
const transcriptEl = $('transcript');
const emptyEl = $('empty');
const connEl = $('conn');
const form = $('ask');
const input = $('q');
const sendButton = $('send');
const stopButton = $('stop');
const newButton = $('new');
const welcomeEl = $('welcome');
const openingEl = $('opening');
const suggestionsEl = $('suggestions');
const appPicker = $('app-picker');
const sidebarEl = $('sidebar');
const sidebarToggle = $('sidebar-toggle');
const convList = $('conversations');
const convEmpty = $('conversations-empty');
const convMore = $('conversations-more');
const inputsForm = $('inputs-form');
const inputsFields = $('inputs-fields');
const attachButton = $('attach');
const fileInput = $('file');
const attachmentsEl = $('attachments');
const micButton = $('mic');
const APP_KEY = 'tokenwire.app';
const ONE_SHOT = new Set(['workflow', 'completion']);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key === 'testid') node.dataset.testid = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  node.append(...children.filter((c) => c != null));
  return node;
}

function userId() {
  let user = localStorage.getItem(USER_KEY);
  if (!user) {
    user = `web-${crypto.randomUUID()}`;
    localStorage.setItem(USER_KEY, user);
  }
  return user;
}

function bearerToken() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

// --- the typewriter: shows a growing answer smoothly, whatever the size of each delta ------

class Typewriter {
  constructor(element) {
    this.el = element;
    this.target = '';
    this.shown = 0;
    this.final = null; // 'done' | 'stopped' | 'error' once the request is over
    this.scheduled = false;
    this.el.dataset.state = 'streaming';
  }

  set(text) {
    if (!text.startsWith(this.target.slice(0, this.shown))) {
      // `replace` or `reset`: keep only what still agrees with the new text.
      let common = 0;
      while (common < this.shown && text[common] === this.target[common]) common += 1;
      this.shown = common;
    }
    this.target = text;
    this.schedule();
  }

  finish(status) {
    this.final = status;
    this.schedule();
  }

  /** Show everything at once (a restored transcript). */
  jump(text, status) {
    this.target = text;
    this.shown = text.length;
    this.final = status;
    this.render();
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => this.tick());
  }

  tick() {
    this.scheduled = false;
    const remaining = this.target.length - this.shown;
    if (remaining > 0) {
      const instant = document.hidden || matchMedia('(prefers-reduced-motion: reduce)').matches;
      // About 6 frames to catch up, at least 2 characters a frame.
      this.shown += instant ? remaining : Math.min(remaining, Math.max(2, Math.ceil(remaining / 6)));
      const code = this.target.charCodeAt(this.shown - 1);
      if (code >= 0xd800 && code <= 0xdbff) this.shown += 1; // never split a surrogate pair
    }
    this.render();
    if (this.shown < this.target.length) this.schedule();
  }

  render() {
    const caughtUp = this.shown >= this.target.length;
    this.el.innerHTML = renderMarkdown(this.target.slice(0, this.shown));
    this.el.dataset.state = caughtUp && this.final ? this.final : 'streaming';
    if (caughtUp && this.final) this.el.setAttribute('aria-busy', 'false');
    keepScrolled();
  }
}

function keepScrolled() {
  const near = transcriptEl.scrollHeight - transcriptEl.scrollTop - transcriptEl.clientHeight < 120;
  if (near) transcriptEl.scrollTop = transcriptEl.scrollHeight;
}

// --- one turn: a question, its status, its thoughts/workflow, its answer --------------------

class Turn {
  constructor(record) {
    this.record = record; // {id, query, text, status, error, events}
    this.el = document.createElement('article');
    this.el.className = 'turn';
    this.el.dataset.requestId = record.id;
    this.el.dataset.testid = 'turn';

    const question = document.createElement('div');
    question.className = 'question';
    question.textContent = record.query;

    const reply = document.createElement('div');
    reply.className = 'reply';
    this.statusEl = document.createElement('div');
    this.statusEl.className = 'req-status';
    this.statusEl.dataset.testid = 'request-status';
    this.thoughts = makeTrace('thoughts', 'Thoughts');
    this.workflow = makeTrace('workflow', 'Workflow');
    this.answerEl = document.createElement('div');
    this.answerEl.className = 'answer';
    this.answerEl.dataset.testid = 'answer';
    this.answerEl.setAttribute('aria-busy', 'true');
    this.formEl = el('div', { class: 'hitl', testid: 'human-input', hidden: true });
    this.outputsEl = el('div', { class: 'outputs', testid: 'outputs', hidden: true });
    this.sources = makeTrace('sources', 'Sources');
    this.toolsEl = el('div', { class: 'tools', testid: 'answer-tools', role: 'group', 'aria-label': 'Answer actions', hidden: true });
    this.followupsEl = el('div', { class: 'suggestions followups', testid: 'follow-ups', role: 'group', 'aria-label': 'Suggested follow-ups', hidden: true });
    reply.append(this.statusEl, this.thoughts.el, this.workflow.el, this.answerEl, this.formEl, this.outputsEl, this.sources.el, this.toolsEl);
    this.el.append(question, reply, this.followupsEl);
    this.writer = new Typewriter(this.answerEl);
    this.steps = new Map();
    this.thoughtItems = new Map();
    for (const ev of record.events ?? []) this.addEvent(ev);
  }

  /** Follow a live (or restored) request of the SDK. */
  attach(request) {
    this.request = request;
    this.clearEvents();
    for (const ev of request.events) this.addEvent(ev);
    this.writer.set(request.text);
    this.showStatus(request);
    request.on('text', (text) => {
      this.record.text = text;
      this.writer.set(text);
    });
    request.on('frame', (frame) => {
      if (frame.type === 'event') this.addEvent({ event: frame.event, data: frame.data });
      if (frame.type === 'reset') this.clearEvents();
      if (frame.type === 'event' || frame.type === 'error') this.renderForm();
    });
    this.renderForm();
    request.on('status', () => this.showStatus(request));
    request.done.then(() => {
      this.record.text = request.text;
      this.record.status = request.status;
      this.record.error = request.error ? `${request.error.code}: ${request.error.frame?.message ?? request.error.message}` : null;
      this.record.events = request.events.map(({ event, data }) => ({ event, data }));
      const end = request.end;
      this.record.messageId = end?.message_id ?? request.start?.messageId ?? null;
      this.record.outputs = end?.outputs ?? null;
      this.record.sources = end?.retriever_resources ?? [];
      this.writer.finish(request.status);
      this.showStatus(request);
      this.renderForm();
      this.showExtras();
      page.onRequestFinished(request, this);
    });
  }

  showStatus(request) {
    const s = request.status;
    let text = '';
    let kind = s;
    if (s === 'sending' || s === 'accepted') {
      text = connection.state === 'open' ? 'Waiting for the answer…' : 'Waiting for the connection…';
      kind = connection.state === 'open' ? 'pending' : 'waiting';
    } else if (s === 'queued') {
      const q = request.queued;
      const secs = q ? Math.max(1, Math.round(q.retryInMs / 1000)) : null;
      text = q
        ? `Queued (${q.reason}) — retrying in ${secs} s, attempt ${q.attempt}${q.position != null ? `, position ${q.position}` : ''}`
        : 'Queued';
    } else if (s === 'answering' && connection.state !== 'open') {
      text = 'Connection lost — the answer will continue after reconnecting…';
      kind = 'waiting';
      this.interrupted = true;
    } else if (s === 'answering' && request.form) {
      text = 'Waiting for your answer to the form below';
      kind = 'form';
    } else if (s === 'answering' && (this.interrupted || request.restored)) {
      text = 'Resumed — the answer continues';
      kind = 'resumed';
    } else if (s === 'stopped') {
      text = 'Stopped';
    } else if (s === 'error') {
      const e = request.error;
      text = `Failed: ${e ? `${e.code} — ${e.frame?.message ?? e.message}` : 'unknown error'}`;
    }
    this.statusEl.textContent = text;
    this.statusEl.dataset.kind = kind;
  }

  /** A finished turn from the stored transcript. */
  showStored() {
    const r = this.record;
    this.writer.jump(r.text ?? '', FINAL.has(r.status) ? r.status : 'error');
    this.statusEl.dataset.kind = r.status;
    if (r.status === 'stopped') this.statusEl.textContent = 'Stopped';
    else if (r.status === 'error') this.statusEl.textContent = `Failed: ${r.error ?? 'interrupted'}`;
    this.showExtras({ followups: false });
  }

  /** Outputs, sources, feedback and copy (and follow-ups) of a finished answer. */
  showExtras({ followups = true } = {}) {
    const r = this.record;
    if (r.outputs && typeof r.outputs === 'object' && Object.keys(r.outputs).length) {
      const dl = el('dl');
      for (const [key, value] of Object.entries(r.outputs)) {
        dl.append(el('dt', { text: key }), el('dd', { text: typeof value === 'string' ? value : JSON.stringify(value, null, 2) }));
      }
      this.outputsEl.replaceChildren(el('h3', { text: 'Outputs' }), dl);
      this.outputsEl.hidden = false;
    }
    const sources = Array.isArray(r.sources) ? r.sources : [];
    this.sources.list.replaceChildren(
      ...sources.map((s) => el('li', {}, el('span', { class: 'label', text: `${s.document_name ?? s.dataset_name ?? 'Source'}` }),
        el('br'), el('span', { text: String(s.content ?? '').slice(0, 400) }))),
    );
    this.sources.update(sources.length, 'source');
    if (r.status === 'error' || (!r.text && r.status !== 'done')) return;
    const buttons = [];
    if (r.messageId && r.kind !== 'run') {
      for (const [rating, label] of [['like', 'Like'], ['dislike', 'Dislike']]) {
        const b = el('button', { type: 'button', class: 'ghost small', testid: rating, 'aria-pressed': String(r.rating === rating), title: `${label} this answer`, text: label, onclick: () => this.rate(rating) });
        buttons.push(b);
      }
    }
    if (r.text) {
      buttons.push(el('button', { type: 'button', class: 'ghost small', testid: 'copy', title: 'Copy the answer', text: 'Copy', onclick: () => this.copy() }));
    }
    this.toolNote = el('span', { class: 'muted note', role: 'status', testid: 'tool-note' });
    this.toolsEl.replaceChildren(...buttons, this.toolNote);
    this.toolsEl.hidden = buttons.length === 0;
    if (followups && r.messageId && page.features.followups && r.kind !== 'run') page.loadFollowups(this);
  }

  async rate(rating) {
    const r = this.record;
    const next = r.rating === rating ? null : rating;
    try {
      await connection.feedback(r.messageId, next, page.appParams());
      r.rating = next;
      page.save();
      for (const b of this.toolsEl.querySelectorAll('[aria-pressed]')) b.setAttribute('aria-pressed', String(b.dataset.testid === next));
      this.toolNote.textContent = next ? 'Thanks for the feedback.' : 'Feedback removed.';
      this.commentForm?.remove();
      if (next) this.askComment(next);
    } catch (error) {
      this.toolNote.textContent = `Feedback failed: ${error.code ?? error.message}`;
    }
  }

  askComment(rating) {
    const field = el('input', { type: 'text', 'aria-label': 'Comment on this answer (optional)', placeholder: 'Add a comment (optional)', testid: 'feedback-comment' });
    const formEl = el('form', { class: 'comment', testid: 'feedback-form' }, field, el('button', { type: 'submit', class: 'small', text: 'Send comment' }));
    formEl.addEventListener('submit', async (event) => {
      event.preventDefault();
      const content = field.value.trim();
      if (!content) return;
      try {
        await connection.feedback(this.record.messageId, rating, { ...page.appParams(), content });
        formEl.remove();
        this.toolNote.textContent = 'Comment sent.';
      } catch (error) {
        this.toolNote.textContent = `Comment failed: ${error.code ?? error.message}`;
      }
    });
    field.addEventListener('keydown', (event) => { if (event.key === 'Escape') { formEl.remove(); } });
    this.commentForm = formEl;
    this.toolsEl.after(formEl);
  }

  async copy() {
    try {
      await navigator.clipboard.writeText(this.record.text ?? '');
      this.toolNote.textContent = 'Copied.';
    } catch {
      const area = el('textarea', { class: 'sr-only' });
      area.value = this.record.text ?? '';
      document.body.append(area);
      area.select();
      document.execCommand('copy');
      area.remove();
      this.toolNote.textContent = 'Copied.';
    }
  }

  /** The human-input form the request waits on: its text, its fields and its action buttons. */
  renderForm() {
    const request = this.request;
    const form = request && !request.finished ? request.form : null;
    if (!form) {
      this.formEl.hidden = true;
      this.formEl.replaceChildren();
      this.formId = null;
      return;
    }
    const refusals = request.refusals ?? [];
    if (this.formId === form.form_id) {
      if (refusals.length) this.formNote.textContent = `Refused: ${refusals[refusals.length - 1].code}`;
      return;
    }
    this.formId = form.form_id;
    const content = String(form.form_content ?? '').replace(/\{\{#\$output\.[^#]*#\}\}/g, '').trim();
    const fields = [];
    const htmlForm = el('form', { class: 'hitl-form', 'aria-label': form.node_title ?? 'Form' });
    for (const [i, item] of (form.inputs ?? []).entries()) {
      const name = String(item.output_variable_name ?? item.variable ?? `field${i}`);
      const id = `hitl-${this.record.id}-${i}`;
      const preset = form.resolved_default_values?.[name] ?? item.default?.value ?? '';
      const type = String(item.type ?? 'text-input');
      const control = formControl(type, { id, name, options: item.options, required: item.required });
      if (type !== 'file' && type !== 'file-list' && preset !== '' && preset != null) control.value = String(preset);
      control.dataset.testid = `form-input-${name}`;
      fields.push({ name, type, control });
      htmlForm.append(el('label', { for: id, text: item.label ?? name }), control);
    }
    const buttons = el('div', { class: 'actions' });
    for (const action of form.actions ?? []) {
      buttons.append(el('button', {
        type: 'submit', value: action.id, testid: `form-action-${action.id}`,
        class: action.button_style === 'primary' ? '' : 'ghost', text: action.title ?? action.id,
      }));
    }
    htmlForm.append(buttons);
    htmlForm.addEventListener('submit', async (event) => {
      event.preventDefault();
      const action = event.submitter?.value ?? form.actions?.[0]?.id;
      const buttonsOf = () => htmlForm.querySelectorAll('button');
      for (const b of buttonsOf()) b.disabled = true;
      try {
        // Files are uploaded first (as the run form's are); the answer carries their refs.
        const inputs = {};
        for (const { name, type, control } of fields) inputs[name] = await controlValue(type, control, true);
        request.answer(action, inputs);
        this.formNote.textContent = 'Sent — the run continues…';
      } catch (error) {
        for (const b of buttonsOf()) b.disabled = false;
        this.formNote.textContent = `Could not answer: ${error.code ?? error.message}`;
      }
    });
    this.formNote = el('p', { class: 'muted', role: 'status' });
    this.formEl.replaceChildren(el('h3', { text: form.node_title ?? 'Your input is needed' }), el('p', { class: 'form-content', text: content }), htmlForm, this.formNote);
    this.formEl.hidden = false;
    this.showStatus(request);
  }

  clearEvents() {
    this.steps.clear();
    this.thoughtItems.clear();
    this.thoughts.list.replaceChildren();
    this.workflow.list.replaceChildren();
    this.thoughts.el.hidden = this.workflow.el.hidden = true;
  }

  addEvent({ event, data }) {
    data = data ?? {};
    if (event === 'agent_thought') {
      const key = String(data.id ?? data.position ?? this.thoughtItems.size);
      const answer = (this.request?.text ?? this.record.text ?? '').trim();
      // An agent's last thought repeats the answer itself: not worth showing twice.
      const repeatsAnswer = typeof data.thought === 'string' && data.thought.trim() === answer && !data.tool;
      const parts = [];
      if (data.thought && !repeatsAnswer) parts.push(['Thought', data.thought]);
      if (data.tool) parts.push(['Tool', data.tool]);
      if (data.tool_input) parts.push(['Input', data.tool_input]);
      if (data.observation) parts.push(['Observation', data.observation]);
      let li = this.thoughtItems.get(key);
      if (!parts.length && repeatsAnswer) {
        li?.remove();
        this.thoughtItems.delete(key);
      } else {
        if (!li) {
          li = document.createElement('li');
          this.thoughtItems.set(key, li);
          this.thoughts.list.append(li);
        }
        li.replaceChildren(...(parts.length ? parts : [['Thinking', '…']]).flatMap(labelled));
      }
      this.thoughts.update(this.thoughts.list.children.length, 'step');
    } else if (event === 'message_file' && typeof data.url === 'string' && /^https?:\/\//i.test(data.url)) {
      const li = document.createElement('li');
      const a = document.createElement('a');
      a.href = data.url;
      a.rel = 'noopener noreferrer nofollow';
      a.target = '_blank';
      a.textContent = `${data.type ?? 'file'} from the assistant`;
      li.append(a);
      this.thoughts.list.append(li);
      this.thoughts.update(this.thoughts.list.children.length, 'step');
    } else if (/^(workflow|node|iteration|loop)_(started|finished)$/.test(event)) {
      const d = data.data ?? data;
      const key = event.startsWith('workflow') ? 'workflow' : String(d.id ?? d.node_id ?? this.steps.size);
      let li = this.steps.get(key);
      if (!li) {
        li = document.createElement('li');
        this.steps.set(key, li);
        this.workflow.list.append(li);
      }
      const title = event.startsWith('workflow') ? 'Workflow' : String(d.title ?? d.node_type ?? 'Step');
      const state = event.endsWith('started') ? 'running' : String(d.status ?? 'finished');
      li.replaceChildren(...labelled([title, state]));
      li.dataset.state = state;
      this.workflow.update(this.steps.size, 'step');
    }
  }
}

/**
 * One control for a Dify form field: the run form's `user_input_form` and a human-input form's
 * `inputs` share the types (text-input, paragraph, select, number, file, file-list).
 */
function formControl(type, { id, name, options, required, maxLength }) {
  let control;
  if (type === 'paragraph') control = el('textarea', { id, rows: 3 });
  else if (type === 'select') {
    const choices = (Array.isArray(options) ? options : []).map((o) => (typeof o === 'object' && o ? String(o.value ?? o.label) : String(o)));
    control = el('select', { id }, ...choices.map((o) => el('option', { value: o, text: o })));
  } else if (type === 'number') control = el('input', { id, type: 'number', step: 'any' });
  else if (type === 'file' || type === 'file-list') control = el('input', { id, type: 'file', multiple: type === 'file-list' });
  else control = el('input', { id, type: 'text', maxlength: maxLength || null });
  if (required) control.required = true;
  control.name = name;
  return control;
}

/** What a control sends: numbers as numbers, files uploaded (refs), undefined for "left empty". */
async function controlValue(type, control, keepEmpty) {
  if (type === 'file' || type === 'file-list') {
    const refs = [];
    for (const file of control.files ?? []) {
      const up = await connection.upload(file, { ...page.appParams() });
      refs.push(fileRef(file, up.id));
    }
    if (!refs.length) return keepEmpty && type === 'file-list' ? [] : undefined;
    return type === 'file' ? refs[0] : refs;
  }
  if (type === 'number') return control.value === '' ? undefined : Number(control.value);
  return control.value !== '' || keepEmpty ? control.value : undefined;
}

function labelled([label, value]) {
  const b = document.createElement('span');
  b.className = 'label';
  b.textContent = `${label}: `;
  const v = document.createElement('span');
  v.textContent = typeof value === 'string' ? value : JSON.stringify(value);
  const br = document.createElement('br');
  return [b, v, br];
}

function makeTrace(kind, title) {
  const el = document.createElement('details');
  el.className = `trace ${kind}`;
  el.dataset.testid = kind;
  el.hidden = true;
  const summary = document.createElement('summary');
  const list = document.createElement('ol');
  el.append(summary, list);
  summary.textContent = title;
  return {
    el,
    list,
    update(count, noun) {
      el.hidden = count === 0;
      summary.textContent = `${title} (${count} ${noun}${count === 1 ? '' : 's'})`;
    },
  };
}

// --- the page ---------------------------------------------------------------------------

// --- embedded by widget.js (?embed=1): title, accent, app and the token come from the host ---

const embed = (() => {
  const q = new URLSearchParams(location.search);
  if (q.get('embed') !== '1' || window.parent === window) return null;
  let parentOrigin = null;
  try {
    parentOrigin = new URL(q.get('parent') ?? '').origin;
  } catch {
    parentOrigin = null;
  }
  // Chromium and Safari say who really embeds us: a host lying about `parent` gets no token.
  const real = location.ancestorOrigins?.[0];
  if (!parentOrigin || parentOrigin === 'null' || (real && real !== parentOrigin)) return { broken: true };
  return { parentOrigin, app: q.get('app'), title: q.get('title'), accent: q.get('accent'), token: q.get('token') === 'parent' };
})();

/** The host page's JWT, asked of widget.js by postMessage to its origin only. */
function tokenFromParent() {
  const nonce = crypto.randomUUID();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => done(null, new Error('the host page gave no token within 10 s')), 10000);
    function done(token, error) {
      clearTimeout(timer);
      window.removeEventListener('message', onMessage);
      if (error) reject(error);
      else resolve(token);
    }
    function onMessage(event) {
      if (event.source !== window.parent || event.origin !== embed.parentOrigin) return;
      const msg = event.data;
      if (msg?.tokenwire !== 'token' || msg.nonce !== nonce) return;
      if (typeof msg.token === 'string' && msg.token) done(msg.token);
      else done(null, new Error(`the host page gave no token: ${msg.error ?? 'empty'}`));
    }
    window.addEventListener('message', onMessage);
    window.parent.postMessage({ tokenwire: 'token?', nonce }, embed.parentOrigin);
  });
}

if (embed && !embed.broken) {
  document.body.classList.add('embed'); // a panel is phone-wide: the list sits behind ☰
  if (embed.title) {
    document.title = embed.title;
    document.querySelector('.bar h1').textContent = embed.title;
  }
  if (embed.accent && CSS.supports('color', embed.accent)) document.documentElement.style.setProperty('--accent', embed.accent);
  const close = $('embed-close');
  close.hidden = false;
  const askClose = () => window.parent.postMessage({ tokenwire: 'close' }, embed.parentOrigin);
  close.addEventListener('click', askClose);
  document.addEventListener('keydown', (event) => {
    // Escape closes the panel, unless it closes something inside it (the list, a rename, a comment).
    if (event.key !== 'Escape' || event.target.closest?.('#sidebar, .rename, .comment')) return;
    askClose();
  });
}

const connection = new Connection({
  user: userId(),
  token: embed?.token && !embed.broken ? tokenFromParent : bearerToken() ? () => sessionStorage.getItem(TOKEN_KEY) : null,
  autoConnect: false,
});

const page = {
  conversationId: null,
  turns: [],
  app: (embed && !embed.broken ? embed.app : null) || localStorage.getItem(APP_KEY) || null, // null: the gateway's default app
  apps: [],
  params: null,
  features: { followups: false },
  attachments: [], // {file, status, ref, el}
  convCursor: null,

  appParams() {
    return this.app ? { app: this.app } : {};
  },

  mode() {
    return this.apps.find((a) => a.app === (this.app ?? 'default'))?.mode ?? 'chat';
  },

  /** The app list, then the chosen app's parameters and conversations. */
  async setup() {
    try {
      this.apps = await connection.apps();
    } catch {
      this.apps = [];
    }
    const names = this.apps.map((a) => a.app);
    if (this.app && !names.includes(this.app)) this.app = null;
    appPicker.replaceChildren(...this.apps.map((a) => el('option', { value: a.app, text: `${a.name ?? a.app}${a.mode ? ` (${a.mode})` : ''}` })));
    appPicker.value = this.app ?? 'default';
    $('app-picker-label').hidden = this.apps.length < 2 || Boolean(embed?.app);
    await this.loadApp();
  },

  async loadApp() {
    let params = {};
    try {
      params = await connection.parameters(this.appParams());
    } catch {
      params = {};
    }
    this.params = params;
    this.features.followups = Boolean(params.suggested_questions_after_answer?.enabled);
    this.renderWelcome();
    this.renderInputs();
    this.renderAttachControls();
    micButton.hidden = !(params.speech_to_text?.enabled && voice.supported() && !ONE_SHOT.has(this.mode()));
    this.loadConversations();
  },

  renderWelcome() {
    const p = this.params ?? {};
    openingEl.textContent = p.opening_statement ?? '';
    openingEl.hidden = !p.opening_statement;
    const questions = Array.isArray(p.suggested_questions) ? p.suggested_questions.filter((q) => typeof q === 'string' && q) : [];
    suggestionsEl.replaceChildren(...questions.map((q) => el('button', { type: 'button', class: 'chip', testid: 'suggested-question', text: q, onclick: () => this.ask(q) })));
    suggestionsEl.hidden = questions.length === 0 || ONE_SHOT.has(this.mode());
    $('empty').hidden = Boolean(p.opening_statement) && this.app != null;
  },

  /** The app's input form (user_input_form): a one-shot app's run form, a chat app's inputs. */
  renderInputs() {
    const items = Array.isArray(this.params?.user_input_form) ? this.params.user_input_form : [];
    const oneShot = ONE_SHOT.has(this.mode());
    inputsFields.replaceChildren();
    this.inputControls = [];
    for (const [i, wrapper] of items.entries()) {
      const [type, spec] = Object.entries(wrapper)[0] ?? [];
      if (!spec) continue;
      const id = `input-${i}`;
      const label = el('label', { for: id, text: `${spec.label ?? spec.variable}${spec.required ? ' *' : ''}` });
      const control = formControl(type, { id, name: spec.variable, options: spec.options, required: spec.required, maxLength: spec.max_length });
      if (spec.default && type !== 'file' && type !== 'file-list') control.value = spec.default;
      control.dataset.testid = `input-${spec.variable}`;
      this.inputControls.push({ type, spec, control });
      inputsFields.append(el('div', { class: 'field' }, label, control));
    }
    inputsForm.hidden = !(oneShot || items.length);
    $('run').hidden = !oneShot;
    form.hidden = oneShot;
  },

  async collectInputs() {
    const inputs = {};
    for (const { type, spec, control } of this.inputControls ?? []) {
      const value = await controlValue(type, control, spec.required);
      if (value !== undefined) inputs[spec.variable] = value;
    }
    return inputs;
  },

  async runApp() {
    const inputs = await this.collectInputs();
    const summary = Object.entries(inputs).map(([k, v]) => `${k}: ${typeof v === 'string' ? v : JSON.stringify(v)}`).join('\n') || 'Run';
    const options = { ...this.appParams() };
    if (this.mode() === 'completion') options.query = inputs.query ?? summary;
    const files = this.takeFiles();
    if (files.length) options.files = files;
    const request = connection.run(inputs, options);
    const turn = this.addTurn({ id: request.id, query: summary, text: '', status: request.status, events: [], kind: 'run', app: this.app });
    turn.attach(request);
    this.save();
    this.refreshControls();
    return request;
  },

  // --- attachments ---
  uploadLimits() {
    const fu = this.params?.file_upload ?? {};
    const sys = this.params?.system_parameters ?? {};
    const image = fu.image ?? {};
    const enabled = Boolean(fu.enabled || image.enabled);
    const imageOnly = !fu.enabled && image.enabled;
    const maxFiles = fu.number_limits ?? image.number_limits ?? 3;
    const mb = (n, fallback) => (typeof n === 'number' && n > 0 ? n : fallback) * 1024 * 1024;
    return {
      enabled,
      imageOnly,
      maxFiles,
      maxImage: mb(sys.image_file_size_limit, 10),
      maxFile: mb(sys.file_size_limit, 15),
      accept: imageOnly ? 'image/*' : (fu.allowed_file_extensions ?? []).join(',') || null,
    };
  },

  renderAttachControls() {
    const limits = this.uploadLimits();
    attachButton.hidden = !limits.enabled;
    if (limits.accept) fileInput.accept = limits.accept;
    else fileInput.removeAttribute('accept');
    if (!limits.enabled) this.clearAttachments();
  },

  addFiles(files) {
    const limits = this.uploadLimits();
    if (!limits.enabled) return;
    for (const file of files) {
      const item = { file, status: 'uploading', ref: null };
      const remove = el('button', { type: 'button', class: 'ghost small', title: `Remove ${file.name}`, text: '×', onclick: () => this.removeAttachment(item) });
      const note = el('span', { class: 'muted' });
      item.el = el('span', { class: 'attachment', testid: 'attachment' }, el('span', { text: file.name || 'pasted file' }), note, remove);
      item.note = note;
      attachmentsEl.append(item.el);
      attachmentsEl.hidden = false;
      const isImage = file.type.startsWith('image/');
      let problem = null;
      if (this.attachments.length >= limits.maxFiles) problem = `at most ${limits.maxFiles} files`;
      else if (limits.imageOnly && !isImage) problem = 'only images';
      else if (file.size > (isImage ? limits.maxImage : limits.maxFile)) problem = `over ${Math.round((isImage ? limits.maxImage : limits.maxFile) / 1048576)} MB`;
      if (problem) {
        item.status = 'error';
        note.textContent = ` — refused: ${problem}`;
        item.el.dataset.state = 'error';
        setTimeout(() => item.el.remove(), 6000);
        continue;
      }
      this.attachments.push(item);
      note.textContent = ' — uploading…';
      item.el.dataset.state = 'uploading';
      connection.upload(file, { ...this.appParams() }).then((up) => {
        item.status = 'ready';
        item.ref = fileRef(file, up.id);
        note.textContent = '';
        item.el.dataset.state = 'ready';
        this.refreshControls();
      }, (error) => {
        item.status = 'error';
        note.textContent = ` — failed: ${error.code ?? error.message}`;
        item.el.dataset.state = 'error';
        this.attachments = this.attachments.filter((a) => a !== item);
        this.refreshControls();
      });
    }
    this.refreshControls();
  },

  removeAttachment(item) {
    this.attachments = this.attachments.filter((a) => a !== item);
    item.el.remove();
    attachmentsEl.hidden = attachmentsEl.children.length === 0;
    this.refreshControls();
  },

  clearAttachments() {
    this.attachments = [];
    attachmentsEl.replaceChildren();
    attachmentsEl.hidden = true;
  },

  takeFiles() {
    const refs = this.attachments.filter((a) => a.ref).map((a) => a.ref);
    this.clearAttachments();
    return refs;
  },

  // --- conversations ---
  async loadConversations({ more = false } = {}) {
    if (ONE_SHOT.has(this.mode())) {
      convList.replaceChildren();
      convEmpty.hidden = false;
      convEmpty.textContent = 'This app runs one-shot: no conversations.';
      convMore.hidden = true;
      return;
    }
    let pageData;
    try {
      pageData = await connection.conversations.list({ ...this.appParams(), limit: 20, ...(more && this.convCursor ? { last_id: this.convCursor } : {}) });
    } catch {
      return;
    }
    if (!more) convList.replaceChildren();
    for (const c of pageData.data ?? []) convList.append(this.conversationItem(c));
    this.convCursor = pageData.data?.length ? pageData.data[pageData.data.length - 1].id : this.convCursor;
    convMore.hidden = !pageData.has_more;
    convEmpty.textContent = 'No conversations yet.';
    convEmpty.hidden = convList.children.length > 0;
    this.markCurrent();
  },

  markCurrent() {
    for (const li of convList.children) {
      const current = li.dataset.conversationId === this.conversationId;
      li.querySelector('.pick')?.setAttribute('aria-current', current ? 'true' : 'false');
    }
  },

  conversationItem(c) {
    const li = el('li', { testid: 'conversation' });
    li.dataset.conversationId = c.id;
    const pick = el('button', { type: 'button', class: 'pick', testid: 'conversation-pick', text: c.name || 'Untitled', title: c.name || 'Untitled', onclick: () => this.openConversation(c.id) });
    const rename = el('button', { type: 'button', class: 'ghost small', testid: 'conversation-rename', title: `Rename “${c.name}”`, 'aria-label': `Rename “${c.name}”`, text: 'Rename', onclick: () => this.renameInline(li, c) });
    const del = el('button', { type: 'button', class: 'ghost small', testid: 'conversation-delete', title: `Delete “${c.name}”`, 'aria-label': `Delete “${c.name}”`, text: 'Delete', onclick: () => this.deleteInline(li, c, del) });
    li.append(pick, rename, del);
    return li;
  },

  renameInline(li, c) {
    const field = el('input', { type: 'text', 'aria-label': 'New name', testid: 'conversation-name' });
    field.value = c.name ?? '';
    const f = el('form', { class: 'rename' }, field);
    const saved = [...li.children];
    li.replaceChildren(f);
    field.focus();
    field.select();
    const restore = () => { li.replaceChildren(...saved); saved[0].focus(); };
    field.addEventListener('keydown', (event) => { if (event.key === 'Escape') restore(); });
    f.addEventListener('submit', async (event) => {
      event.preventDefault();
      const name = field.value.trim();
      if (!name) return restore();
      try {
        await connection.conversations.rename({ ...this.appParams(), conversation_id: c.id, name });
        c.name = name;
        saved[0].textContent = name;
      } catch {
        // keep the old name
      }
      restore();
    });
  },

  async deleteInline(li, c, button) {
    if (button.dataset.confirm !== '1') {
      button.dataset.confirm = '1';
      button.textContent = 'Delete?';
      button.setAttribute('aria-label', `Confirm deleting “${c.name}”`);
      setTimeout(() => {
        if (!button.isConnected) return;
        button.dataset.confirm = '';
        button.textContent = 'Delete';
        button.setAttribute('aria-label', `Delete “${c.name}”`);
      }, 5000);
      return;
    }
    try {
      await connection.conversations.delete({ ...this.appParams(), conversation_id: c.id });
      li.remove();
      convEmpty.hidden = convList.children.length > 0;
      if (this.conversationId === c.id) this.reset();
    } catch {
      button.textContent = 'Delete';
    }
  },

  async openConversation(id) {
    this.stopAll();
    let history = [];
    try {
      const got = await connection.messages.list({ ...this.appParams(), conversation_id: id, limit: 100 });
      history = [...(got.data ?? [])].sort((a, b) => (a.created_at ?? 0) - (b.created_at ?? 0));
    } catch {
      return;
    }
    this.clearTranscript();
    this.conversationId = id;
    for (const m of history) {
      const turn = this.addTurn({ id: `history-${m.id}`, query: m.query ?? '', text: m.answer ?? '', status: 'done', messageId: m.id, rating: m.feedback?.rating ?? null, sources: m.retriever_resources ?? [], app: this.app });
      turn.showStored();
    }
    this.save();
    this.markCurrent();
    this.refreshControls();
    closeSidebarOnPhone();
    input.focus();
  },

  async loadFollowups(turn) {
    let questions = [];
    try {
      questions = await connection.suggested(turn.record.messageId, this.appParams());
    } catch {
      return;
    }
    if (turn !== this.turns[this.turns.length - 1]) return;
    for (const t of this.turns) if (t !== turn) t.followupsEl.hidden = true;
    turn.followupsEl.replaceChildren(...questions.map((q) => el('button', { type: 'button', class: 'chip', testid: 'follow-up', text: q, onclick: () => this.ask(q) })));
    turn.followupsEl.hidden = questions.length === 0;
    keepScrolled();
  },

  load() {
    let saved = null;
    try {
      saved = JSON.parse(sessionStorage.getItem(PAGE_KEY) ?? 'null');
    } catch {
      saved = null;
    }
    const restored = new Map(connection.restored.map((r) => [r.id, r]));
    if (saved && Array.isArray(saved.turns)) {
      this.conversationId = saved.conversationId ?? null;
      if (saved.app !== undefined && (saved.app ?? null) !== this.app) this.conversationId = null;
      for (const record of saved.turns) {
        const turn = this.addTurn(record);
        const request = restored.get(record.id);
        if (request) {
          restored.delete(record.id);
          turn.attach(request);
        } else if (FINAL.has(record.status)) {
          turn.showStored();
        } else {
          record.status = 'error';
          record.error = record.error ?? 'interrupted (the page was closed mid-answer)';
          turn.showStored();
        }
      }
    }
    for (const request of restored.values()) {
      // Stored by the SDK but not in the transcript (e.g. sent by another script): show it.
      this.addTurn({ id: request.id, query: request.query, text: '', status: request.status }).attach(request);
    }
    this.save();
    this.refreshControls();
  },

  save() {
    const data = {
      app: this.app,
      conversationId: this.conversationId,
      turns: this.turns.map((t) => t.record),
    };
    try {
      sessionStorage.setItem(PAGE_KEY, JSON.stringify(data));
    } catch {
      // storage full: the transcript just won't survive a reload
    }
  },

  addTurn(record) {
    const turn = new Turn(record);
    this.turns.push(turn);
    welcomeEl.hidden = true;
    transcriptEl.append(turn.el);
    transcriptEl.scrollTop = transcriptEl.scrollHeight;
    return turn;
  },

  /** A chat app's inputs (non-file fields), sent with the first message of a conversation. */
  chatInputs() {
    if (this.conversationId || ONE_SHOT.has(this.mode())) return null;
    const inputs = {};
    for (const { type, spec, control } of this.inputControls ?? []) {
      if (type === 'file' || type === 'file-list' || control.value === '') continue;
      inputs[spec.variable] = type === 'number' ? Number(control.value) : control.value;
    }
    return Object.keys(inputs).length ? inputs : null;
  },

  ask(query, options = {}) {
    const extra = { ...this.appParams() };
    const inputs = this.chatInputs();
    if (inputs) extra.inputs = inputs;
    if (!ONE_SHOT.has(this.mode())) inputsForm.hidden = true;
    const files = this.takeFiles();
    if (files.length) extra.files = files;
    for (const t of this.turns) t.followupsEl.hidden = true;
    const request = connection.chat(query, { conversationId: this.conversationId, ...extra, ...options });
    const turn = this.addTurn({ id: request.id, query, text: '', status: request.status, events: [], app: this.app, files: files.length });
    turn.attach(request);
    this.save();
    this.refreshControls();
    return request;
  },

  running() {
    return this.turns.filter((t) => t.request && !t.request.finished).map((t) => t.request);
  },

  onRequestFinished(request) {
    const fresh = request.conversationId && request.conversationId !== this.conversationId;
    if (request.conversationId && request.status !== 'error' && request.kind !== 'run') this.conversationId = request.conversationId;
    this.save();
    this.refreshControls();
    if (fresh && request.kind !== 'run') this.loadConversations();
  },

  stopAll() {
    for (const request of this.running()) request.stop();
  },

  clearTranscript() {
    for (const turn of this.turns) turn.el.remove();
    this.turns = [];
    welcomeEl.hidden = false;
    inputsForm.hidden = !(ONE_SHOT.has(this.mode()) || (this.inputControls ?? []).length);
  },

  reset() {
    this.stopAll();
    this.conversationId = null;
    this.clearTranscript();
    this.save();
    this.markCurrent();
    this.refreshControls();
    (form.hidden ? inputsFields.querySelector('input,textarea,select') ?? $('run') : input).focus();
  },

  refreshControls() {
    const busy = this.running().length > 0;
    const uploading = this.attachments.some((a) => a.status === 'uploading');
    stopButton.disabled = !busy;
    sendButton.disabled = busy || uploading;
    $('run').disabled = busy;
  },
};

function showConnection({ state, attempt, delayMs, code }) {
  connEl.dataset.state = state;
  if (state === 'open') connEl.textContent = 'connected';
  else if (state === 'connecting') connEl.textContent = 'connecting…';
  else if (state === 'idle') connEl.textContent = 'idle';
  else if (state === 'reconnecting') {
    const wait = delayMs ? ` in ${(delayMs / 1000).toFixed(1)} s` : ' now';
    connEl.textContent = `reconnecting${wait} (attempt ${attempt ?? 1})…`;
  } else if (state === 'closed') {
    connEl.textContent = code === 4001 ? 'signed out: the token was refused' : `disconnected${code ? ` (${code})` : ''}`;
  }
  for (const turn of page.turns) if (turn.request && !turn.request.finished) turn.showStatus(turn.request);
}

connection.on('state', showConnection);
connection.on('error', (error) => {
  if (connection.state === 'closed') connEl.title = error.message;
  console.warn('tokenwire:', error.message);
});

form.addEventListener('submit', (event) => {
  event.preventDefault();
  const query = input.value.trim();
  if (!query || sendButton.disabled) return;
  input.value = '';
  autosize();
  page.ask(query);
});

input.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

function autosize() {
  input.style.height = 'auto';
  input.style.height = `${Math.min(input.scrollHeight + 2, 192)}px`;
}
input.addEventListener('input', autosize);
stopButton.addEventListener('click', () => page.stopAll());
newButton.addEventListener('click', () => page.reset());

function fileRef(file, id) {
  const t = file.type || '';
  const type = t.startsWith('image/') ? 'image' : t.startsWith('audio/') ? 'audio' : t.startsWith('video/') ? 'video' : 'document';
  return { type, transfer_method: 'local_file', upload_file_id: id };
}

attachButton.addEventListener('click', () => fileInput.click());
fileInput.addEventListener('change', () => {
  page.addFiles([...fileInput.files]);
  fileInput.value = '';
  input.focus();
});
input.addEventListener('paste', (event) => {
  const files = [...(event.clipboardData?.files ?? [])];
  if (files.length) {
    event.preventDefault();
    page.addFiles(files);
  }
});
for (const target of [transcriptEl, form]) {
  target.addEventListener('dragover', (event) => {
    if (!page.uploadLimits().enabled || !event.dataTransfer?.types.includes('Files')) return;
    event.preventDefault();
    document.body.classList.add('dropping');
  });
  target.addEventListener('dragleave', () => document.body.classList.remove('dropping'));
  target.addEventListener('drop', (event) => {
    document.body.classList.remove('dropping');
    const files = [...(event.dataTransfer?.files ?? [])];
    if (!files.length) return;
    event.preventDefault();
    page.addFiles(files);
  });
}

inputsForm.addEventListener('submit', (event) => {
  event.preventDefault();
  if (!ONE_SHOT.has(page.mode()) || $('run').disabled) return;
  page.runApp().catch((error) => console.warn('tokenwire: run failed', error));
});

// --- voice input: record, encode as 16 kHz mono WAV (what every Dify accepts), transcribe ---
const voice = {
  recorder: null,
  chunks: [],
  supported() {
    return Boolean(navigator.mediaDevices?.getUserMedia && window.MediaRecorder && window.AudioContext);
  },
  async toggle() {
    if (this.recorder) {
      this.recorder.stop();
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      micButton.title = `No microphone: ${error.message}`;
      return;
    }
    this.chunks = [];
    this.recorder = new MediaRecorder(stream);
    this.recorder.ondataavailable = (event) => this.chunks.push(event.data);
    this.recorder.onstop = async () => {
      for (const track of stream.getTracks()) track.stop();
      this.recorder = null;
      micButton.setAttribute('aria-pressed', 'false');
      micButton.textContent = 'Mic';
      micButton.disabled = true;
      input.placeholder = 'Transcribing…';
      try {
        const wav = await toWav(new Blob(this.chunks, { type: this.chunks[0]?.type || 'audio/webm' }));
        const text = await connection.audioToText(wav, { ...page.appParams(), filename: 'voice.wav' });
        input.value = input.value ? `${input.value} ${text}` : text;
        autosize();
      } catch (error) {
        input.placeholder = `Voice input failed: ${error.code ?? error.message}`;
      } finally {
        micButton.disabled = false;
        if (input.placeholder === 'Transcribing…') input.placeholder = 'Ask something…';
        input.focus();
      }
    };
    this.recorder.start();
    micButton.setAttribute('aria-pressed', 'true');
    micButton.textContent = 'Stop rec';
  },
};

async function toWav(blob) {
  const context = new AudioContext();
  const decoded = await context.decodeAudioData(await blob.arrayBuffer());
  context.close();
  const rate = 16000;
  const offline = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * rate)), rate);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const samples = (await offline.startRendering()).getChannelData(0);
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (offset, s) => { for (let i = 0; i < s.length; i += 1) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, 'RIFF'); view.setUint32(4, 36 + samples.length * 2, true); text(8, 'WAVE'); text(12, 'fmt ');
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true); view.setUint16(34, 16, true);
  text(36, 'data'); view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i += 1) view.setInt16(44 + i * 2, Math.max(-1, Math.min(1, samples[i])) * 0x7fff, true);
  return new Blob([view], { type: 'audio/wav' });
}

micButton.addEventListener('click', () => voice.toggle());

appPicker.addEventListener('change', () => {
  page.app = appPicker.value === 'default' ? null : appPicker.value;
  if (page.app) localStorage.setItem(APP_KEY, page.app);
  else localStorage.removeItem(APP_KEY);
  page.reset();
  page.loadApp();
});

convMore.addEventListener('click', () => page.loadConversations({ more: true }));

const phone = matchMedia('(max-width: 760px)');
function closeSidebarOnPhone() {
  if (phone.matches) setSidebar(false);
}
function setSidebar(open) {
  document.body.classList.toggle('sidebar-open', open);
  sidebarToggle.setAttribute('aria-expanded', String(open));
  if (open) convList.querySelector('button')?.focus();
}
sidebarToggle.addEventListener('click', () => {
  const open = phone.matches ? !document.body.classList.contains('sidebar-open') : document.body.classList.contains('sidebar-hidden');
  if (phone.matches) setSidebar(open);
  else {
    document.body.classList.toggle('sidebar-hidden', !open);
    sidebarToggle.setAttribute('aria-expanded', String(open));
  }
});
sidebarEl.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && phone.matches) {
    setSidebar(false);
    sidebarToggle.focus();
  }
});
sidebarToggle.setAttribute('aria-expanded', String(!phone.matches));

page.load();
let setupDone = false;
connection.on('hello', () => {
  if (setupDone) return;
  setupDone = true;
  page.setup();
});
connection.connect().catch(() => {});
input.focus();

// For tests and the curious: the SDK connection and the page.
window.__tokenwire = { connection, page };
