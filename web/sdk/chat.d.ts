// Types of chat.js: a chat session over one Connection, as a framework-neutral store.

import type { ChatOptions, ChatRequest, Connection, ConnectionState, RequestStatus } from './tokenwire.js';

/** One question and its answer, as the UI shows it (a new object on every change). */
export interface ChatMessage {
  readonly id: string;
  readonly query: string;
  /** The answer so far. */
  readonly text: string;
  readonly status: RequestStatus;
  readonly error: { readonly code: string; readonly message: string } | null;
  /** Dify's message id once known (for feedback). */
  readonly messageId: string | null;
  readonly conversationId: string | null;
}

export interface ChatSnapshot {
  readonly messages: readonly ChatMessage[];
  /** The conversation the next `send` continues (null: a new one). */
  readonly conversationId: string | null;
  /** True while an answer is running. */
  readonly busy: boolean;
  readonly connectionState: ConnectionState;
}

export interface ChatSessionOptions {
  /** The gateway's app name (default: its default app). */
  app?: string | null;
  /** Continue this conversation. */
  conversationId?: string | null;
}

export class ChatSession {
  constructor(connection: Connection, options?: ChatSessionOptions);
  readonly connection: Connection;
  subscribe(listener: (snapshot: ChatSnapshot) => void): () => void;
  getSnapshot(): ChatSnapshot;
  send(query: string, options?: ChatOptions): ChatRequest;
  stop(): void;
  reset(): void;
}
