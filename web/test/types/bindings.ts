// Type-checks the React, Vue and ChatSession declarations the way an app would use them.

import { Connection } from '../../sdk/tokenwire.js';
import { ChatSession, type ChatMessage, type ChatSnapshot } from '../../sdk/chat.js';
import { useChat as useReactChat, useTokenwire as useReactTokenwire } from '../../sdk/react.js';
import { useChat as useVueChat, useTokenwire as useVueTokenwire } from '../../sdk/vue.js';

const connection: Connection = useReactTokenwire({ url: 'wss://chat.example.com/v1/ws', token: async () => 'jwt' });
const chat = useReactChat(connection, { app: 'support' });
const first: ChatMessage | undefined = chat.messages[0];
const busy: boolean = chat.busy;
const request = chat.send('Hello', { inputs: { lang: 'en' } });
void request.done.then((r) => r.text.length);
// @ts-expect-error a question is a string
chat.send(42);
chat.stop();
chat.reset();

const vueConnection = useVueTokenwire({ user: 'alice' });
const vue = useVueChat(vueConnection);
const messages: readonly ChatMessage[] = vue.messages.value;
const state: ChatSnapshot = vue.state.value;
vue.send('Hi');

const session = new ChatSession(connection, { conversationId: null });
const off: () => void = session.subscribe((s) => s.messages.length);
off();

export const used = [first, busy, messages, state, vue.busy.value, vue.connectionState.value];
