// Vue 3 bindings of the SDK (`@tokenwire/client/vue`): useTokenwire() makes a Connection closed
// with the calling scope, useChat() mirrors a ChatSession (chat.js) into a shallowRef, so
// templates see every delta; computed refs give its parts.

import { computed, getCurrentScope, onScopeDispose, shallowRef } from 'vue';

import { ChatSession } from './chat.js';
import { Connection } from './tokenwire.js';

/** A connected Connection, closed when the component (or effect scope) goes. */
export function useTokenwire(options = {}) {
  const connection = new Connection({ autoConnect: false, ...options });
  connection.connect().catch(() => {});
  if (getCurrentScope()) onScopeDispose(() => connection.close());
  return connection;
}

/** The chat in `connection`: refs `messages`, `conversationId`, `busy`, `connectionState`, and send/stop/reset. */
export function useChat(connection, options = {}) {
  const session = new ChatSession(connection, options);
  const state = shallowRef(session.getSnapshot());
  const off = session.subscribe((snapshot) => {
    state.value = snapshot;
  });
  if (getCurrentScope()) onScopeDispose(off);
  return {
    state,
    messages: computed(() => state.value.messages),
    conversationId: computed(() => state.value.conversationId),
    busy: computed(() => state.value.busy),
    connectionState: computed(() => state.value.connectionState),
    send: session.send,
    stop: session.stop,
    reset: session.reset,
    session,
  };
}

export { ChatSession };
