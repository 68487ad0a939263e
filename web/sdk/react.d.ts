// Types of react.js (`@tokenwire/client/react`).

import type { ChatOptions, ChatRequest, Connection, ConnectionOptions } from './tokenwire.js';
import type { ChatSession, ChatSessionOptions, ChatSnapshot } from './chat.js';

export type { ChatMessage, ChatSessionOptions, ChatSnapshot } from './chat.js';
export { ChatSession } from './chat.js';

export interface UseChatResult extends ChatSnapshot {
  send(query: string, options?: ChatOptions): ChatRequest;
  stop(): void;
  reset(): void;
  readonly session: ChatSession;
}

/** One Connection for the component's life (made from the first render's options), connected while mounted. */
export function useTokenwire(options?: ConnectionOptions): Connection;

/** Follow a chat over `connection`; re-renders on every delta, status and connection state. */
export function useChat(connection: Connection, options?: ChatSessionOptions): UseChatResult;
