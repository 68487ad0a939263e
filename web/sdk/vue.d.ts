// Types of vue.js (`@tokenwire/client/vue`).

import type { ComputedRef, ShallowRef } from 'vue';

import type { ChatOptions, ChatRequest, Connection, ConnectionOptions, ConnectionState } from './tokenwire.js';
import type { ChatMessage, ChatSession, ChatSessionOptions, ChatSnapshot } from './chat.js';

export type { ChatMessage, ChatSessionOptions, ChatSnapshot } from './chat.js';
export { ChatSession } from './chat.js';

export interface UseChatResult {
  readonly state: Readonly<ShallowRef<ChatSnapshot>>;
  readonly messages: ComputedRef<readonly ChatMessage[]>;
  readonly conversationId: ComputedRef<string | null>;
  readonly busy: ComputedRef<boolean>;
  readonly connectionState: ComputedRef<ConnectionState>;
  send(query: string, options?: ChatOptions): ChatRequest;
  stop(): void;
  reset(): void;
  readonly session: ChatSession;
}

/** A connected Connection, closed when the calling component or effect scope is disposed. */
export function useTokenwire(options?: ConnectionOptions): Connection;

/** Follow a chat over `connection` in refs that change on every delta, status and connection state. */
export function useChat(connection: Connection, options?: ChatSessionOptions): UseChatResult;
