// A chat session over one SDK connection, as a store any UI framework can follow: an immutable
// snapshot ({messages, conversationId, busy, connectionState}) that changes on every delta,
// status and connection state, plus send/stop/reset. react.js and vue.js are thin wrappers;
// a framework we do not ship bindings for needs only subscribe() and getSnapshot().

const FINAL = new Set(['done', 'stopped', 'error']);

function message(request) {
  return Object.freeze({
    id: request.id,
    query: request.query,
    text: request.text,
    status: request.status,
    error: request.error ? { code: request.error.code, message: request.error.message } : null,
    messageId: request.end?.message_id ?? request.start?.messageId ?? null,
    conversationId: request.conversationId ?? null,
  });
}

export class ChatSession {
  constructor(connection, { app = null, conversationId = null } = {}) {
    this.connection = connection;
    this.app = app;
    this.requests = new Map();
    this.listeners = new Set();
    this.snapshot = Object.freeze({ messages: [], conversationId, busy: false, connectionState: connection.state });
    this.offState = null;
    // Bound, so a framework can pass them around as they are.
    this.subscribe = this.subscribe.bind(this);
    this.getSnapshot = this.getSnapshot.bind(this);
    this.send = this.send.bind(this);
    this.stop = this.stop.bind(this);
    this.reset = this.reset.bind(this);
  }

  /** Call `listener` after every change; returns the unsubscribe function. */
  subscribe(listener) {
    this.listeners.add(listener);
    if (!this.offState) this.offState = this.connection.on('state', ({ state }) => this.set({ connectionState: state }));
    return () => {
      this.listeners.delete(listener);
      if (!this.listeners.size && this.offState) {
        this.offState();
        this.offState = null;
      }
    };
  }

  getSnapshot() {
    return this.snapshot;
  }

  /** Ask `query` in this session's conversation (the first answer starts one). */
  send(query, options = {}) {
    const request = this.connection.chat(query, { app: this.app, conversationId: this.snapshot.conversationId, ...options });
    this.requests.set(request.id, request);
    const update = () => this.update(request);
    request.on('text', update);
    request.on('status', update);
    request.done.then(() => {
      this.requests.delete(request.id);
      const conversationId = request.status !== 'error' && request.conversationId ? request.conversationId : this.snapshot.conversationId;
      this.update(request, { conversationId });
    });
    this.set({ messages: [...this.snapshot.messages, message(request)] });
    return request;
  }

  /** Stop every answer still running. */
  stop() {
    for (const request of this.requests.values()) request.stop();
  }

  /** A new conversation: running answers are stopped, the messages cleared. */
  reset() {
    this.stop();
    this.requests.clear();
    this.set({ messages: [], conversationId: null });
  }

  update(request, extra = {}) {
    const messages = this.snapshot.messages.map((m) => (m.id === request.id ? message(request) : m));
    this.set({ messages, ...extra });
  }

  set(changes) {
    const next = { ...this.snapshot, ...changes };
    next.busy = next.messages.some((m) => !FINAL.has(m.status));
    this.snapshot = Object.freeze(next);
    for (const listener of [...this.listeners]) listener(this.snapshot);
  }
}
