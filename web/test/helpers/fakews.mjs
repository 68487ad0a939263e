// An in-process fake WebSocket for SDK unit tests: the test plays the gateway.

export class FakeWebSocket {
  /** Every socket the SDK opened, oldest first. */
  static instances = [];

  static reset() {
    FakeWebSocket.instances = [];
  }

  static get last() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }

  constructor(url, protocols) {
    this.url = url;
    this.protocols = typeof protocols === 'string' ? [protocols] : [...(protocols ?? [])];
    this.readyState = 0;
    /** Frames the SDK sent, decoded. */
    this.sent = [];
    this.closedWith = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    FakeWebSocket.instances.push(this);
  }

  send(data) {
    if (this.readyState !== 1) throw new Error('InvalidStateError: not open');
    this.sent.push(JSON.parse(data));
  }

  close(code = 1005, reason = '') {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    this.closedWith = { code, reason };
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }

  // --- the gateway's side ---

  /** Open and say hello. */
  accept(user = 'u1') {
    this.readyState = 1;
    this.emit({ type: 'hello', session: `s${FakeWebSocket.instances.indexOf(this)}`, user, protocol: 1, server: 'fake' });
  }

  emit(frame) {
    this.onmessage?.({ data: typeof frame === 'string' ? frame : JSON.stringify(frame) });
  }

  /** The server closes (or the network drops, with 1006). */
  drop(code = 1006, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  sentOfType(type) {
    return this.sent.filter((f) => f.type === type);
  }
}

/** sessionStorage stand-in. */
export class MemoryStorage {
  constructor() {
    this.map = new Map();
  }

  getItem(key) {
    return this.map.has(key) ? this.map.get(key) : null;
  }

  setItem(key, value) {
    this.map.set(key, String(value));
  }

  removeItem(key) {
    this.map.delete(key);
  }
}

/** The frames a gateway sends for one answer: accepted, start, one delta per token, end. */
export function answerFrames(id, tokens, { conversationId = 'c-1', from = 1 } = {}) {
  const frames = [
    { type: 'accepted', id },
    { type: 'start', id, conversation_id: conversationId, message_id: 'm-1', task_id: 't-1' },
    ...tokens.map((text) => ({ type: 'delta', id, text })),
    { type: 'end', id, conversation_id: conversationId, message_id: 'm-1', usage: null, retriever_resources: [], stopped: false },
  ];
  return frames.map((f, i) => ({ ...f, seq: i + 1 })).filter((f) => f.seq >= from);
}
