// React bindings of the SDK (`@tokenwire/client/react`): useTokenwire() keeps one Connection
// for the component's life, useChat() follows a ChatSession (chat.js) with
// useSyncExternalStore, so every delta re-renders and nothing tears under concurrent rendering.

import { useEffect, useRef, useState, useSyncExternalStore } from 'react';

import { ChatSession } from './chat.js';
import { Connection } from './tokenwire.js';

/** One Connection (made once from the first `options`), connected while mounted. */
export function useTokenwire(options = {}) {
  const [connection] = useState(() => new Connection({ autoConnect: false, ...options }));
  const closing = useRef(null);
  useEffect(() => {
    // StrictMode unmounts and mounts again at once: close only if no mount follows.
    clearTimeout(closing.current);
    connection.connect().catch(() => {});
    return () => {
      closing.current = setTimeout(() => connection.close(), 0);
    };
  }, [connection]);
  return connection;
}

/** The chat in `connection`: {messages, conversationId, busy, connectionState, send, stop, reset}. */
export function useChat(connection, options = {}) {
  const [session] = useState(() => new ChatSession(connection, options));
  const snapshot = useSyncExternalStore(session.subscribe, session.getSnapshot, session.getSnapshot);
  return { ...snapshot, send: session.send, stop: session.stop, reset: session.reset, session };
}

export { ChatSession };
