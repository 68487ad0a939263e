// tokenwire browser SDK: the WebSocket protocol v1 with reconnect and resume built in.
//
// How this works
// --------------
// A `Connection` owns at most one WebSocket at a time. Every `chat()` becomes a `ChatRequest`
// that holds the request's state: the last `seq` it has applied, the running answer `text`
// (with `replace` and `reset` applied), its status and its agent/workflow `events`.
//
// Frames of a request carry `seq` 1, 2, 3 ...; a request applies a frame only when its seq
// is above the last one it holds, so frames replayed by the gateway after a `resume` are
// never applied twice. When the socket closes, the close code's policy (close-codes.js,
// generated from the Python catalogue shared/exceptions.py) says what happens next:
//
// - `reconnect`: wait an exponential backoff with jitter (at least the `retry_after_ms` of an
//   error that came just before, plus up to `jitter` of it again at random, so that clients
//   told the same hint do not all come back at once) and reconnect; on the new `hello` every
//   unfinished request
//   is sent again: a `resume {id, after: lastSeq}` when the gateway has acknowledged it, else
//   the same `chat` (same id: the gateway recognises it and never asks Dify twice).
// - `refresh_token` (4002, the token expired): the same, with a fresh token from the token
//   function (asked before every connect); with a fixed token, or after MAX_REFRESH_TRIES
//   refusals in a row with no progress in between, give up.
// - `wait_for_user` (4103 idle, 1000): reconnect only when there is something to send: at
//   once if requests are unfinished, else on the next `chat()`.
// - `give_up` (4001, 4003, ...): the connection closes; unfinished requests fail.
//
// A `resume` the gateway is too busy for (`too_busy`: an `error` with the request's `id` and
// no `seq`; the request is untouched) is sent again after its `retry_after_ms`, jittered the
// same way, on the same socket (a new socket resumes it anyway).
//
// The backoff starts over only once a socket made progress (a request frame applied) or
// stayed open `stableAfterMs`: a `hello` followed at once by the same close does not reset it.
// `hello.limits.max_frame_bytes` is the largest frame the gateway reads: a `chat` over it
// fails locally with `frame_too_large` and is never sent.
//
// Unfinished requests are also written to sessionStorage after every frame, so a page reload
// picks them up (`connection.restored`) and resumes them from where the page left off.
//
// `call(method, params)` (and `conversations.list()`, `messages.list()`, `feedback()`,
// `suggested()`, `parameters()`, …) is one request/response call to Dify's Service API as this
// user: it resolves with the one `result` (or rejects with the `error`) of its id; a call whose
// socket closed before its answer is sent again after the reconnect. `upload(file)` and
// `audioToText(file)` POST the file to the gateway's `/v1/files` and `/v1/audio-to-text`.
//
// A `ping` frame goes out every `pingIntervalMs`; if nothing at all arrives within
// `pongTimeoutMs` after it, the socket is treated as dead and replaced.
//
// Zero dependencies; runs in browsers and in Node (pass `WebSocket` and `storage`).

import { CLOSE_CODES } from './close-codes.js';

export const PROTOCOL = 'tokenwire.v1';
export const VERSION = '0.1.0';
/** Token refreshes (closes with 4002) in a row without progress before giving up. */
export const MAX_REFRESH_TRIES = 3;

const STORAGE_PREFIX = 'tokenwire:v1:';
const MAX_STORED_EVENTS = 200;
const TERMINAL_STATUSES = new Set(['done', 'stopped', 'error']);

/** @type {Required<import('./tokenwire.js').BackoffOptions>} */
export const DEFAULT_BACKOFF = Object.freeze({ initialMs: 500, maxMs: 15000, factor: 2, jitter: 0.5 });

/**
 * Delay before reconnect attempt `attempt` (0-based): exponential, capped, with jitter.
 * With jitter j the delay is uniform in [base * (1 - j), base].
 */
export function backoffDelay(attempt, options = {}, random = Math.random) {
  const o = { ...DEFAULT_BACKOFF, ...options };
  const base = Math.min(o.maxMs, o.initialMs * Math.pow(o.factor, Math.max(0, attempt)));
  const jitter = Math.min(1, Math.max(0, o.jitter));
  return Math.max(0, Math.round(base * (1 - jitter * random())));
}

/**
 * The wait for a server's retry hint of `hintMs`: uniform in [hint, hint * (1 + jitter)],
 * never less than the hint, spread so that a crowd told the same hint does not return at once.
 */
export function hintDelay(hintMs, options = {}, random = Math.random) {
  const o = { ...DEFAULT_BACKOFF, ...options };
  const jitter = Math.min(1, Math.max(0, o.jitter));
  return Math.ceil(Math.max(0, hintMs) * (1 + jitter * random()));
}

/**
 * What a client does after a close with `code`: 'reconnect' | 'refresh_token' |
 * 'wait_for_user' | 'give_up' (codes outside the catalogue: its default, 'reconnect').
 */
export function closePolicy(code) {
  const entry = code == null ? undefined : CLOSE_CODES.codes[String(code)];
  return entry ? entry.policy : CLOSE_CODES.default;
}

const UTF8 = new TextEncoder();
function frameBytes(frame) {
  return UTF8.encode(JSON.stringify(frame)).length;
}

/** `ws(s)://<host>/v1/ws` of the page that loaded the SDK. */
export function defaultUrl(loc = globalThis.location) {
  if (!loc) throw new TypeError('no location: pass options.url');
  const scheme = loc.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${loc.host}/v1/ws`;
}

/** An `error` frame (or a local failure) as an Error: `code`, `retryable`, `frame`. */
export class TokenwireError extends Error {
  constructor(code, message, retryable = false, frame = null) {
    super(`${code}: ${message}`);
    this.name = 'TokenwireError';
    this.code = code;
    this.retryable = retryable;
    this.frame = frame;
  }
}

/** A tiny typed event emitter (EventTarget's CustomEvent is missing in older runtimes). */
class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
  }

  /** Subscribe; returns a function that unsubscribes. */
  on(type, handler) {
    let set = this._handlers.get(type);
    if (!set) this._handlers.set(type, (set = new Set()));
    set.add(handler);
    return () => this.off(type, handler);
  }

  off(type, handler) {
    this._handlers.get(type)?.delete(handler);
  }

  _emit(type, payload) {
    const set = this._handlers.get(type);
    if (!set) return;
    for (const handler of [...set]) {
      try {
        handler(payload);
      } catch (err) {
        // A handler's bug must not break the protocol pump.
        queueMicrotask(() => {
          throw err;
        });
      }
    }
  }
}

let idCounter = 0;
function newRequestId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  idCounter += 1;
  return `r-${Date.now().toString(36)}-${idCounter}-${Math.random().toString(36).slice(2, 10)}`;
}

/**
 * One chat request: its frames, its running answer text and its outcome.
 *
 * `for await (const frame of request)` yields every frame from the first one this object saw,
 * in seq order, each exactly once, and ends after `end` or `error`.
 */
export class ChatRequest extends Emitter {
  constructor(connection, init) {
    super();
    this._connection = connection;
    this.id = init.id;
    this.query = init.query;
    this.conversationId = init.conversationId ?? null;
    /** The conversation this request was asked in (what a re-sent chat must name). */
    this._askedIn = init.askedIn !== undefined ? init.askedIn : this.conversationId;
    this.inputs = init.inputs ?? {};
    this.files = init.files ?? [];
    this.app = init.app ?? null;
    /** 'chat' (a conversational app) or 'run' (a workflow or completion app). */
    this.kind = init.kind ?? 'chat';
    /** Refused answers to this run's form (`error` frames with no seq; the run goes on). */
    this.refusals = [];
    this.text = init.text ?? '';
    this.lastSeq = init.lastSeq ?? 0;
    this.status = init.status ?? 'sending';
    this.queued = init.queued ?? null;
    this.start = init.start ?? null;
    this.events = init.events ?? [];
    this.end = null;
    this.error = null;
    this.restored = Boolean(init.restored);
    this.createdAt = init.createdAt ?? Date.now();
    /** Frames applied, in order (what async iterators replay). */
    this.frames = [];
    this._stopWanted = Boolean(init.stopWanted);
    this._sentOn = -1;
    this._waiters = new Set();
    this.done = new Promise((resolve) => {
      this._resolveDone = resolve;
    });
  }

  /** True once `end` or `error` arrived. */
  get finished() {
    return TERMINAL_STATUSES.has(this.status);
  }

  /** Ask the gateway to stop this answer (also at Dify); `end` with `stopped: true` follows. */
  stop() {
    this._connection.stop(this.id);
  }

  /**
   * The human-input form this run waits on (Dify's `human_input_required` data: `form_id`,
   * `node_title`, `form_content`, `inputs`, `actions`, …; never its token), or null.
   */
  get form() {
    if (this.finished) return null;
    let waiting = null;
    for (const event of this.events) {
      if (event.event === 'human_input_required') waiting = event.data?.data ?? null;
      else if (event.event === 'human_input_form_filled' || event.event === 'human_input_form_timeout') {
        waiting = null;
      }
    }
    return waiting;
  }

  /** Answer the waiting form with one of its `actions` (by id); the run then continues. */
  answer(action, inputs = {}) {
    const form = this.form;
    if (!form) throw new TypeError('this request waits for no form');
    this._connection.answer(this.id, form.form_id, action, inputs);
  }

  /**
   * Apply one frame of this request. Returns false (and changes nothing) for a frame already
   * applied, which is what a replay after `resume` delivers first.
   */
  _apply(frame) {
    if (this.finished || typeof frame.seq !== 'number' || frame.seq <= this.lastSeq) return false;
    this.lastSeq = frame.seq;
    const before = this.text;
    const statusBefore = this.status;
    switch (frame.type) {
      case 'accepted':
        if (this.status === 'sending') this.status = 'accepted';
        break;
      case 'queued':
        this.status = 'queued';
        this.queued = {
          reason: frame.reason,
          attempt: frame.attempt,
          retryInMs: frame.retry_in_ms,
          position: frame.position ?? null,
        };
        break;
      case 'start':
        this.status = 'answering';
        this.queued = null;
        this.start = {
          conversationId: frame.conversation_id ?? null,
          messageId: frame.message_id ?? null,
          taskId: frame.task_id ?? null,
        };
        if (frame.conversation_id) this.conversationId = frame.conversation_id;
        break;
      case 'delta':
        this.status = 'answering';
        this.text += frame.text;
        break;
      case 'replace':
        this.text = frame.text;
        break;
      case 'reset':
        this.text = '';
        this.events = [];
        this.status = 'accepted';
        break;
      case 'event':
        this.events.push({ event: frame.event, data: frame.data ?? {}, seq: frame.seq });
        break;
      case 'end':
        this.end = frame;
        this.status = frame.stopped ? 'stopped' : 'done';
        if (frame.conversation_id) this.conversationId = frame.conversation_id;
        break;
      case 'error':
        this.error = new TokenwireError(frame.code, frame.message, Boolean(frame.retryable), frame);
        this.status = 'error';
        break;
      default:
        break; // a frame type from a newer gateway: counted, otherwise ignored
    }
    this.frames.push(frame);
    this._emit('frame', frame);
    if (this.text !== before) this._emit('text', this.text);
    if (this.status !== statusBefore || frame.type === 'queued') this._emit('status', this.status);
    for (const wake of this._waiters) wake();
    if (this.finished) {
      this._emit(this.status === 'error' ? 'error' : 'end', this);
      this._resolveDone(this);
    }
    return true;
  }

  /** Finish locally (no frame from the gateway), e.g. when the connection gives up for good. */
  _fail(error) {
    if (this.finished) return;
    this.error = error;
    this.status = 'error';
    this._emit('status', this.status);
    for (const wake of this._waiters) wake();
    this._emit('error', this);
    this._resolveDone(this);
  }

  _snapshot() {
    return {
      id: this.id,
      query: this.query,
      conversationId: this.conversationId,
      askedIn: this._askedIn,
      inputs: this.inputs,
      files: this.files,
      app: this.app,
      kind: this.kind,
      text: this.text,
      lastSeq: this.lastSeq,
      status: this.status,
      queued: this.queued,
      start: this.start,
      events: this.events.slice(-MAX_STORED_EVENTS),
      stopWanted: this._stopWanted,
      createdAt: this.createdAt,
    };
  }

  _chatFrame() {
    if (this.kind === 'run') {
      const run = { type: 'run', id: this.id, inputs: this.inputs ?? {} };
      if (this.query) run.query = this.query;
      if (this.files && this.files.length) run.files = this.files;
      if (this.app) run.app = this.app;
      return run;
    }
    const frame = { type: 'chat', id: this.id, query: this.query };
    if (this._askedIn) frame.conversation_id = this._askedIn;
    if (this.inputs && Object.keys(this.inputs).length) frame.inputs = this.inputs;
    if (this.files && this.files.length) frame.files = this.files;
    if (this.app) frame.app = this.app;
    return frame;
  }

  [Symbol.asyncIterator]() {
    let index = 0;
    const self = this;
    return {
      next() {
        return new Promise((resolve) => {
          const attempt = () => {
            if (index < self.frames.length) {
              self._waiters.delete(attempt);
              resolve({ value: self.frames[index++], done: false });
            } else if (self.finished) {
              self._waiters.delete(attempt);
              resolve({ value: undefined, done: true });
            } else {
              self._waiters.add(attempt);
            }
          };
          attempt();
        });
      },
      return() {
        index = Number.POSITIVE_INFINITY;
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }
}

/**
 * One logical connection to a tokenwire gateway, surviving socket drops.
 *
 * Events (`connection.on(type, fn)`): `state` ({state, attempt, delayMs, code, reason}),
 * `hello` (the hello frame), `error` (a connection-level `error` frame, or a local failure),
 * `frame` (every frame received), `pong`.
 */
export class Connection extends Emitter {
  constructor(options = {}) {
    super();
    this.url = options.url ?? defaultUrl();
    this.user = options.user ?? null;
    this._token = options.token ?? null;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    }
    this.backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    this.pingIntervalMs = options.pingIntervalMs ?? 20000;
    this.pongTimeoutMs = options.pongTimeoutMs ?? 10000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this.stableAfterMs = options.stableAfterMs ?? 10000;
    this._random = options.random ?? Math.random;
    this._storage = options.storage === undefined ? defaultStorage() : options.storage;
    this._storageKey = options.storageKey ?? STORAGE_PREFIX + this._socketUrl();
    this.state = 'idle';
    this.attempt = 0;
    this.session = null;
    this.hello = null;
    this.lastClose = null;
    /** @type {Map<string, ChatRequest>} unfinished requests, by id */
    this.requests = new Map();
    /** Calls waiting for their `result` or `error`, by id (re-sent after a reconnect). */
    this._calls = new Map();
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    const call = (method) => (params = {}) => this.call(method, params);
    /** `conversations.list({limit, last_id, sort_by, app})`, `.rename({conversation_id, name})`, … */
    this.conversations = Object.freeze({
      list: call('conversations.list'),
      rename: call('conversations.rename'),
      delete: call('conversations.delete'),
      variables: call('conversations.variables'),
      setVariable: call('conversations.set_variable'),
    });
    /** `messages.list({conversation_id, first_id, limit})`: a page of history, newest first. */
    this.messages = Object.freeze({ list: call('messages.list') });
    this._ws = null;
    this._generation = 0;
    this._closedByUser = false;
    this._refreshTries = 0;
    // Of the current socket: when its hello came (0: none yet), whether a request frame was
    // applied on it, and the retry hint of its last connection-level error.
    this._openedAt = 0;
    this._progressed = false;
    this._retryAfterMs = 0;
    this._reconnectTimer = null;
    this._busyTimers = new Set(); // resumes waiting out a too_busy hint
    this._pingTimer = null;
    this._deadTimer = null;
    this._connectTimer = null;
    this._openWaiters = [];
    /** Requests found in sessionStorage: they resume once the connection is open. */
    this.restored = this._restore();
    if (options.autoConnect !== false && this.restored.length) this.connect();
    this._onOnline = () => {
      if (this.state === 'reconnecting') this._reconnectNow();
    };
    globalThis.addEventListener?.('online', this._onOnline);
  }

  /** Open the connection (idempotent); resolves once the gateway said `hello`. */
  connect() {
    this._closedByUser = false;
    if (this.state === 'open') return Promise.resolve();
    const waiter = new Promise((resolve, reject) => this._openWaiters.push({ resolve, reject }));
    if (this.state === 'idle' || this.state === 'closed') {
      this.attempt = 0;
      this._open();
    } else if (this.state === 'reconnecting') {
      this._reconnectNow();
    }
    return waiter;
  }

  /**
   * Ask a question. Returns at once; the request is sent as soon as the connection is open
   * (connecting if needed) and survives reconnects.
   */
  chat(query, options = {}) {
    if (typeof query !== 'string' || query.length === 0) {
      throw new TypeError('query must be a non-empty string');
    }
    const request = new ChatRequest(this, {
      id: options.id ?? newRequestId(),
      query,
      conversationId: options.conversationId ?? null,
      inputs: options.inputs,
      files: options.files,
      app: options.app,
    });
    if (this._refuseOversize(request)) return request; // known too large: failed, never sent
    this._track(request);
    if (this.state === 'open') this._sendRequest(request);
    else if (this.state === 'idle' || this.state === 'closed') this.connect().catch(() => {});
    return request;
  }

  /**
   * Run a workflow or completion app (`options.query`: a completion's). The same request
   * object as a chat; a workflow's `end` carries `outputs`, `status` and `workflow_run_id`,
   * and a run waiting for a person has a `form` to `answer()`.
   */
  run(inputs = {}, options = {}) {
    const request = new ChatRequest(this, {
      id: options.id ?? newRequestId(),
      query: options.query ?? '',
      inputs,
      files: options.files,
      app: options.app,
      kind: 'run',
    });
    if (this._refuseOversize(request)) return request;
    this._track(request);
    if (this.state === 'open') this._sendRequest(request);
    else if (this.state === 'idle' || this.state === 'closed') this.connect().catch(() => {});
    return request;
  }

  /** Answer the form request `id` waits on (an `input` frame); a refusal lands in `refusals`. */
  answer(id, formId, action, inputs = {}) {
    this._send({ type: 'input', id, form_id: formId, action, inputs });
  }

  /**
   * One call to Dify's Service API as this connection's user (docs/protocol.md lists the
   * methods). Resolves with Dify's body (`result.data`), rejects with a TokenwireError whose
   * `code` is the protocol's (`not_found`, `bad_params`, …). A call whose socket was lost before
   * its answer is sent again after the reconnect.
   */
  call(method, params = {}, options = {}) {
    const id = `call-${newRequestId()}`;
    const frame = { type: 'call', id, method, params: { ...params } };
    return new Promise((resolve, reject) => {
      const pending = { frame, resolve, reject, sentOn: 0, timer: null };
      const timeoutMs = options.timeoutMs ?? 60000;
      pending.timer = setTimeout(() => {
        this._calls.delete(id);
        reject(new TokenwireError('timeout', `no answer to ${method} in ${timeoutMs} ms`, true));
      }, timeoutMs);
      this._calls.set(id, pending);
      if (this.state === 'open') this._sendCall(pending);
      else if (this.state === 'idle' || this.state === 'closed') this.connect().catch(() => {});
    });
  }

  /** `feedback(messageId, 'like' | 'dislike' | null, {content})` */
  feedback(messageId, rating, options = {}) {
    return this.call('messages.feedback', { ...options, message_id: messageId, rating });
  }

  /** Suggested follow-up questions of a message (`feature_disabled` when off for the app). */
  async suggested(messageId, options = {}) {
    const data = await this.call('messages.suggested', { ...options, message_id: messageId });
    return data.data ?? [];
  }

  /** The configured apps with their `/info` (name, description, mode). */
  async apps() {
    return (await this.call('apps.list')).data ?? [];
  }

  /** The app's opening statement, input form, feature toggles and upload limits. */
  parameters(options = {}) {
    return this.call('app.parameters', options);
  }

  info(options = {}) {
    return this.call('app.info', options);
  }

  meta(options = {}) {
    return this.call('app.meta', options);
  }

  site(options = {}) {
    return this.call('app.site', options);
  }

  /** `{mime_type, audio}` (base64) for `{message_id}` or `{text}`. */
  textToAudio(options) {
    return this.call('text.to_audio', options);
  }

  /** A workflow run this user started (another user's is `not_found`). */
  runDetails(workflowRunId, options = {}) {
    return this.call('runs.get', { ...options, workflow_run_id: workflowRunId });
  }

  /** `POST /v1/files`: Dify's file object; put its `id` in `chat(q, {files: [...]})`. */
  upload(file, options = {}) {
    return this._postFile('/files', file, options, 201);
  }

  /** `POST /v1/audio-to-text`: the transcript. */
  async audioToText(file, options = {}) {
    return (await this._postFile('/audio-to-text', file, options, 200)).text ?? '';
  }

  /** The gateway's HTTP base (`http(s)://host/v1`) for its WebSocket URL. */
  httpBase() {
    const url = new URL(this.url);
    url.protocol = url.protocol === 'wss:' ? 'https:' : url.protocol === 'ws:' ? 'http:' : url.protocol;
    url.pathname = url.pathname.replace(/\/ws$/, '') || '/v1';
    url.search = '';
    return url.toString().replace(/\/$/, '');
  }

  async _postFile(path, file, options, expect) {
    if (typeof this._fetch !== 'function') throw new TypeError('no fetch: pass options.fetch');
    const form = new FormData();
    if (options.app) form.append('app', options.app); // before the file: the limits depend on it
    form.append('file', file, options.filename ?? file.name ?? 'upload');
    const headers = {};
    const token = typeof this._token === 'function' ? await this._token() : this._token;
    if (token) headers.Authorization = `Bearer ${token}`;
    let url = this.httpBase() + path;
    if (!token && this.user) url += `?user=${encodeURIComponent(this.user)}`;
    const response = await this._fetch(url, { method: 'POST', body: form, headers });
    let body = {};
    try {
      body = await response.json();
    } catch {
      // not JSON: described by the status below
    }
    if (response.status !== expect) {
      throw new TokenwireError(
        body.code ?? `http_${response.status}`,
        body.message ?? response.statusText ?? 'upload failed',
        Boolean(body.retryable ?? response.status >= 500),
        body,
      );
    }
    return body;
  }

  _sendCall(pending) {
    pending.sentOn = this._generation;
    this._send(pending.frame);
  }

  _answerCall(frame) {
    const pending = this._calls.get(frame.id);
    if (!pending) return false;
    this._calls.delete(frame.id);
    clearTimeout(pending.timer);
    if (frame.type === 'result') pending.resolve(frame.data);
    else pending.reject(new TokenwireError(frame.code, frame.message, Boolean(frame.retryable), frame));
    return true;
  }

  /** Stop a request by id (sent now, or right after the next reconnect). */
  stop(id) {
    const request = this.requests.get(id);
    if (request) {
      if (request.finished) return;
      request._stopWanted = true;
      this._persist();
    }
    if (this.state === 'open') this._send({ type: 'stop', id });
  }

  /** Send a `ping` now (the heartbeat does this on its own). */
  ping() {
    this._send({ type: 'ping' });
  }

  /** Close for good: no reconnect. Unfinished requests stay stored and resume on `connect()`. */
  close(code = 1000, reason = 'client closed') {
    this._closedByUser = true;
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(code, reason);
      } catch {
        // already closing
      }
    }
    this._setState('closed', { code, reason });
    this._rejectOpenWaiters(new TokenwireError('closed', 'the connection was closed'));
    for (const pending of [...this._calls.values()]) {
      clearTimeout(pending.timer);
      pending.reject(new TokenwireError('closed', 'the connection was closed'));
    }
    this._calls.clear();
  }

  /** Drop the socket as a network failure would; the connection reconnects and resumes. */
  dropForTesting() {
    const ws = this._ws;
    if (!ws) return;
    this._handleClose(ws, 4199, 'dropped for testing');
    try {
      ws.close();
    } catch {
      // ignore
    }
  }

  /** Forget every stored request (e.g. on log-out). */
  clearStorage() {
    try {
      this._storage?.removeItem(this._storageKey);
    } catch {
      // storage may be unavailable
    }
  }

  // --- socket lifecycle --------------------------------------------------------------------

  _socketUrl() {
    if (!this.user) return this.url;
    const sep = this.url.includes('?') ? '&' : '?';
    return `${this.url}${sep}user=${encodeURIComponent(this.user)}`;
  }

  async _open() {
    this._clearTimers();
    this._setState(this.attempt === 0 && !this.hello ? 'connecting' : 'reconnecting', {
      attempt: this.attempt,
      delayMs: 0,
    });
    const generation = ++this._generation;
    this._openedAt = 0;
    this._progressed = false;
    this._retryAfterMs = 0;
    const protocols = [PROTOCOL];
    if (this._token) {
      let token;
      try {
        token = typeof this._token === 'function' ? await this._token() : this._token;
      } catch (err) {
        if (generation !== this._generation || this._closedByUser) return;
        this._emit('error', new TokenwireError('token_unavailable', String(err?.message ?? err), true));
        this._scheduleReconnect(null, 'token provider failed');
        return;
      }
      if (generation !== this._generation || this._closedByUser) return;
      if (token) protocols.push(`bearer.${token}`);
    }
    let ws;
    try {
      ws = new this._WebSocket(this._socketUrl(), protocols);
    } catch (err) {
      this._emit('error', new TokenwireError('connect_failed', String(err?.message ?? err), true));
      this._scheduleReconnect(null, 'connect failed');
      return;
    }
    this._ws = ws;
    ws.onmessage = (event) => this._onMessage(ws, event.data);
    ws.onclose = (event) => this._handleClose(ws, event.code, event.reason);
    ws.onerror = () => {}; // a close event always follows
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && this.state !== 'open') this._drop(ws, 'connect timeout');
    }, this.connectTimeoutMs);
  }

  _onMessage(ws, data) {
    if (ws !== this._ws) return;
    this._armDeadTimer(false);
    let frame;
    try {
      frame = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
    } catch {
      return; // the gateway only sends JSON; ignore anything else
    }
    if (!frame || typeof frame !== 'object' || typeof frame.type !== 'string') return;
    this._receive(frame);
  }

  /** Handle one decoded server frame (exposed to tests as `_receive`). */
  _receive(frame) {
    this._emit('frame', frame);
    if (frame.type === 'hello') {
      this._onHello(frame);
      return;
    }
    if (frame.type === 'pong') {
      this._emit('pong', frame);
      return;
    }
    if ((frame.type === 'result' || frame.type === 'error') && this._calls.has(frame.id)) {
      this._answerCall(frame);
      return;
    }
    if (frame.type === 'error' && typeof frame.seq !== 'number' && frame.code === 'too_busy' && this.requests.has(frame.id)) {
      // The gateway had no room for this request's resume: the same resume, later.
      this._resumeLater(this.requests.get(frame.id), frame.retry_after_ms ?? 1000);
      return;
    }
    if (frame.type === 'error' && typeof frame.seq !== 'number' && this.requests.has(frame.id)) {
      // An answer to this request's form was refused: the run itself goes on.
      const request = this.requests.get(frame.id);
      const error = new TokenwireError(frame.code, frame.message, Boolean(frame.retryable), frame);
      request.refusals.push(error);
      request._emit('refused', error);
      return;
    }
    if (typeof frame.id === 'string' && typeof frame.seq === 'number') {
      const request = this.requests.get(frame.id);
      if (request && request._apply(frame)) {
        this._progressed = true;
        if (request.finished) this.requests.delete(request.id);
        this._persist();
      }
      return;
    }
    if (frame.type === 'error') {
      if (typeof frame.retry_after_ms === 'number') this._retryAfterMs = frame.retry_after_ms;
      if (frame.code === 'frame_too_large') this._failOversizeSuspect();
      this._emit(
        'error',
        new TokenwireError(frame.code, frame.message, Boolean(frame.retryable), frame),
      );
    }
  }

  _onHello(frame) {
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    // No backoff reset here: a hello followed at once by the same close must not make the
    // next reconnect immediate (see _handleClose).
    this.hello = frame;
    this.session = frame.session ?? null;
    this._openedAt = Date.now();
    const generation = this._generation;
    this._setState('open', {});
    this._emit('hello', frame);
    for (const request of [...this.requests.values()]) {
      if (request._sentOn !== generation) this._sendRequest(request);
    }
    for (const pending of [...this._calls.values()]) {
      if (pending.sentOn !== generation) this._sendCall(pending); // its answer was lost
    }
    this._startHeartbeat();
    const waiters = this._openWaiters;
    this._openWaiters = [];
    for (const w of waiters) w.resolve();
  }

  _resumeLater(request, hintMs) {
    const generation = this._generation;
    const timer = setTimeout(() => {
      this._busyTimers.delete(timer);
      // A new socket resumes every unfinished request by itself.
      if (generation === this._generation && this.requests.get(request.id) === request) this._sendRequest(request);
    }, hintDelay(hintMs, this.backoff, this._random));
    this._busyTimers.add(timer);
  }

  _sendRequest(request) {
    if (request.finished || this._refuseOversize(request)) return;
    request._sentOn = this._generation;
    if (request.lastSeq === 0) {
      // Never acknowledged: send the chat again. The same id is one request at the gateway,
      // so a chat that did arrive before the drop is replayed, not asked twice.
      this._send(request._chatFrame());
    } else {
      this._send({ type: 'resume', id: request.id, after: request.lastSeq });
    }
    if (request._stopWanted) this._send({ type: 'stop', id: request.id });
  }

  _handleClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._detach(ws);
    this._ws = null;
    this._clearTimers();
    this.lastClose = { code, reason: reason ?? '' };
    if (this._closedByUser) {
      this._setState('closed', { code, reason });
      return;
    }
    if (this._openedAt && (this._progressed || Date.now() - this._openedAt >= this.stableAfterMs)) {
      this.attempt = 0; // this socket was good: start the backoff over
      this._refreshTries = 0;
    }
    if (code === 1009) this._failOversizeSuspect();
    let policy = closePolicy(code);
    if (policy === 'refresh_token') {
      this._refreshTries += 1;
      // Asked again before the reconnect; a fixed token cannot be refreshed.
      if (typeof this._token !== 'function' || this._refreshTries > MAX_REFRESH_TRIES) policy = 'give_up';
    }
    if (policy === 'give_up') {
      this._setState('closed', { code, reason });
      const message = `the gateway closed the connection (${code} ${reason ?? ''})`.trim();
      const kind = code === 4001 ? 'unauthorized' : code === 4002 ? 'token_expired' : 'closed';
      const error = new TokenwireError(kind, message, false);
      this._emit('error', error);
      this._rejectOpenWaiters(error);
      // Nothing will answer them on this connection: end them instead of leaving them waiting.
      for (const request of this.requests.values()) {
        request._fail(new TokenwireError('connection_closed', message, true));
      }
      this.requests.clear();
      for (const pending of this._calls.values()) {
        clearTimeout(pending.timer);
        pending.reject(new TokenwireError('connection_closed', message, true));
      }
      this._calls.clear();
      this._persist();
      return;
    }
    if (policy === 'wait_for_user' && this.requests.size === 0) {
      // Nothing to send: reconnect lazily, on the next chat(). A connect() still waiting for
      // a hello (closed before it) is told, not left hanging.
      this._setState('idle', { code, reason });
      this._rejectOpenWaiters(new TokenwireError('closed', `the gateway closed the connection (${code})`, true));
      return;
    }
    this._scheduleReconnect(code, reason);
  }

  /** Fail a chat the gateway announced it would refuse (hello.limits); true if failed. */
  _refuseOversize(request) {
    const limit = this.hello?.limits?.max_frame_bytes;
    if (typeof limit !== 'number' || !(limit > 0) || request.lastSeq > 0) return false;
    const size = frameBytes(request._chatFrame());
    if (size <= limit) return false;
    request._fail(
      new TokenwireError('frame_too_large', `the chat frame is ${size} bytes, over the gateway's limit of ${limit}`, false),
    );
    if (this.requests.delete(request.id)) this._persist();
    return true;
  }

  /**
   * The gateway refused a frame as too large without naming it (a limit this client did not
   * know): fail the largest chat on this socket that it never acknowledged, so that it is not
   * sent again after the reconnect.
   */
  _failOversizeSuspect() {
    if (typeof this.hello?.limits?.max_frame_bytes === 'number') return; // nothing over it was sent
    let suspect = null;
    let largest = -1;
    for (const request of this.requests.values()) {
      if (request.lastSeq !== 0 || request._sentOn !== this._generation) continue;
      const size = frameBytes(request._chatFrame());
      if (size > largest) [suspect, largest] = [request, size];
    }
    if (!suspect) return;
    suspect._fail(new TokenwireError('frame_too_large', 'the gateway refused the chat as too large', false));
    this.requests.delete(suspect.id);
    this._persist();
  }

  _scheduleReconnect(code, reason) {
    this._clearTimers();
    const hinted = this._retryAfterMs > 0 ? hintDelay(this._retryAfterMs, this.backoff, this._random) : 0;
    const delayMs = Math.max(backoffDelay(this.attempt, this.backoff, this._random), hinted);
    this.attempt += 1;
    this._setState('reconnecting', { attempt: this.attempt, delayMs, code, reason });
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this._open();
    }, delayMs);
  }

  _reconnectNow() {
    if (this._reconnectTimer === null) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._open();
  }

  _drop(ws, reason) {
    this._handleClose(ws, 4199, reason);
    try {
      ws.close();
    } catch {
      // ignore
    }
  }

  _detach(ws) {
    ws.onmessage = null;
    ws.onclose = null;
    ws.onerror = null;
  }

  _send(frame) {
    const ws = this._ws;
    if (!ws || this.state !== 'open') return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      this._drop(ws, 'send failed');
      return false;
    }
  }

  // --- heartbeat ------------------------------------------------------------------------

  _startHeartbeat() {
    clearInterval(this._pingTimer);
    if (!(this.pingIntervalMs > 0)) return;
    this._pingTimer = setInterval(() => {
      // An unanswered earlier ping keeps its deadline: pings must not postpone it.
      if (this._send({ type: 'ping' }) && this._deadTimer === null) this._armDeadTimer(true);
    }, this.pingIntervalMs);
  }

  /** After a ping: expect any frame within pongTimeoutMs. Any frame disarms it. */
  _armDeadTimer(arm) {
    clearTimeout(this._deadTimer);
    this._deadTimer = null;
    if (!arm) return;
    const ws = this._ws;
    this._deadTimer = setTimeout(() => {
      if (ws && ws === this._ws) this._drop(ws, 'no pong');
    }, this.pongTimeoutMs);
  }

  _clearTimers() {
    clearTimeout(this._reconnectTimer);
    clearInterval(this._pingTimer);
    clearTimeout(this._deadTimer);
    clearTimeout(this._connectTimer);
    for (const timer of this._busyTimers) clearTimeout(timer);
    this._busyTimers.clear();
    this._reconnectTimer = this._pingTimer = this._deadTimer = this._connectTimer = null;
  }

  _setState(state, detail) {
    this.state = state;
    this._emit('state', { state, ...detail });
  }

  _rejectOpenWaiters(error) {
    const waiters = this._openWaiters;
    this._openWaiters = [];
    for (const w of waiters) w.reject(error);
  }

  // --- persistence (sessionStorage) -------------------------------------------------------

  _track(request) {
    this.requests.set(request.id, request);
    this._persist();
  }

  _persist() {
    if (!this._storage) return;
    const open = [...this.requests.values()].filter((r) => !r.finished).map((r) => r._snapshot());
    try {
      if (open.length) this._storage.setItem(this._storageKey, JSON.stringify(open));
      else this._storage.removeItem(this._storageKey);
    } catch {
      // quota or privacy mode: resume after reload is best effort
    }
  }

  _restore() {
    if (!this._storage) return [];
    let stored;
    try {
      stored = JSON.parse(this._storage.getItem(this._storageKey) ?? '[]');
    } catch {
      return [];
    }
    if (!Array.isArray(stored)) return [];
    const restored = [];
    for (const s of stored) {
      if (!s || typeof s.id !== 'string' || typeof s.query !== 'string') continue;
      if (TERMINAL_STATUSES.has(s.status) || this.requests.has(s.id)) continue;
      const request = new ChatRequest(this, { ...s, restored: true });
      this.requests.set(request.id, request);
      restored.push(request);
    }
    return restored;
  }
}

function defaultStorage() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null; // access can throw in sandboxed frames
  }
}

/** Connect with the page's defaults: `new Connection(options)` then `connect()`. */
export function connect(options = {}) {
  const connection = new Connection(options);
  connection.connect().catch(() => {});
  return connection;
}
