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
    reply.append(this.statusEl, this.thoughts.el, this.workflow.el, this.answerEl);
    this.el.append(question, reply);
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
    });
    request.on('status', () => this.showStatus(request));
    request.done.then(() => {
      this.record.text = request.text;
      this.record.status = request.status;
      this.record.error = request.error ? `${request.error.code}: ${request.error.frame?.message ?? request.error.message}` : null;
      this.record.events = request.events.map(({ event, data }) => ({ event, data }));
      this.writer.finish(request.status);
      this.showStatus(request);
      page.onRequestFinished(request);
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

const connection = new Connection({
  user: userId(),
  token: bearerToken() ? () => sessionStorage.getItem(TOKEN_KEY) : null,
  autoConnect: false,
});

const page = {
  conversationId: null,
  turns: [],

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
    emptyEl.hidden = true;
    transcriptEl.append(turn.el);
    transcriptEl.scrollTop = transcriptEl.scrollHeight;
    return turn;
  },

  ask(query, options = {}) {
    const request = connection.chat(query, { conversationId: this.conversationId, ...options });
    const turn = this.addTurn({ id: request.id, query, text: '', status: request.status, events: [] });
    turn.attach(request);
    this.save();
    this.refreshControls();
    return request;
  },

  running() {
    return this.turns.filter((t) => t.request && !t.request.finished).map((t) => t.request);
  },

  onRequestFinished(request) {
    if (request.conversationId && request.status !== 'error') this.conversationId = request.conversationId;
    this.save();
    this.refreshControls();
  },

  stopAll() {
    for (const request of this.running()) request.stop();
  },

  reset() {
    this.stopAll();
    this.conversationId = null;
    for (const turn of this.turns) turn.el.remove();
    this.turns = [];
    emptyEl.hidden = false;
    this.save();
    this.refreshControls();
    input.focus();
  },

  refreshControls() {
    const busy = this.running().length > 0;
    stopButton.disabled = !busy;
    sendButton.disabled = busy;
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

page.load();
connection.connect().catch(() => {});
input.focus();

// For tests and the curious: the SDK connection and the page.
window.__tokenwire = { connection, page };
