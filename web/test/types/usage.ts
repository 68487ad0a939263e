// Compiled by `tsc --noEmit -p web/` (never run): the SDK's .d.ts must describe real use,
// and the @ts-expect-error lines prove it refuses misuse.

import {
  Connection,
  TokenwireError,
  backoffDelay,
  closePolicy,
  type ChatRequest,
  type ClosePolicy,
  type ConnectionState,
  type RequestFrame,
  type StateChange,
} from '../../sdk/tokenwire.js';
import { renderMarkdown } from '../../sdk/markdown.js';

export async function example(): Promise<string> {
  const connection = new Connection({
    url: 'wss://chat.example/v1/ws',
    token: async () => 'jwt',
    backoff: { initialMs: 250, maxMs: 10_000 },
    pingIntervalMs: 20_000,
  });
  const unsubscribe = connection.on('state', (change: StateChange) => {
    const state: ConnectionState = change.state;
    if (state === 'reconnecting') console.log(`retry in ${change.delayMs ?? 0} ms`);
  });
  connection.on('error', (error) => console.warn(error.code, error.retryable, error.frame?.retry_after_ms));
  connection.on('state', ({ code }) => {
    const policy: ClosePolicy = closePolicy(code);
    if (policy === 'wait_for_user') console.log('idle until the next question');
  });
  await connection.connect();
  const limit: number | undefined = connection.hello?.limits.max_frame_bytes;
  void limit;

  const request: ChatRequest = connection.chat('Hello?', {
    conversationId: null,
    inputs: { topic: 'tokenwire' },
    files: [{ type: 'image', transfer_method: 'remote_url', url: 'https://example.com/a.png' }],
  });
  request.on('text', (text: string) => console.log(text.length));
  for await (const frame of request) {
    const f: RequestFrame = frame;
    switch (f.type) {
      case 'delta':
      case 'replace':
        console.log(f.text, f.seq);
        break;
      case 'queued':
        console.log(f.reason, f.retry_in_ms);
        break;
      case 'event':
        console.log(f.event, f.data);
        break;
      case 'end':
        console.log(f.stopped, f.conversation_id);
        break;
      case 'error':
        console.log(f.code, f.message);
        break;
      default:
        break;
    }
  }
  const done = await request.done;
  if (done.error instanceof TokenwireError) return done.error.code;
  for (const restored of connection.restored) restored.stop();
  unsubscribe();
  connection.close();
  return renderMarkdown(done.text) + String(backoffDelay(3));
}

export function misuse(connection: Connection, request: ChatRequest): void {
  // @ts-expect-error the query is a string
  connection.chat(42);
  // @ts-expect-error no such option
  connection.chat('q', { conversation: 'c' });
  // @ts-expect-error the text is read-only
  request.text = 'edited';
  // @ts-expect-error no such event
  request.on('delta', () => {});
  // @ts-expect-error text handlers get a string
  request.on('text', (n: number) => n);
  // @ts-expect-error the state is one of a few names
  const s: ConnectionState = 'online';
  void s;
  // @ts-expect-error a policy is one of four names
  const p: ClosePolicy = 'retry';
  void p;
}

export async function calls(connection: Connection): Promise<void> {
  const page = await connection.conversations.list({ limit: 20 });
  const first = page.data[0];
  if (first) {
    const history = await connection.messages.list({ conversation_id: first.id, limit: 10 });
    const last = history.data[history.data.length - 1];
    if (last) {
      await connection.feedback(last.id, 'like');
      const next: string[] = await connection.suggested(last.id);
      console.log(next.length);
    }
    await connection.conversations.rename({ conversation_id: first.id, name: 'Trip' });
  }
  const params = await connection.parameters({ app: 'sales' });
  console.log(params['opening_statement']);
  const file = await connection.upload(new Blob(['x'], { type: 'image/png' }), { filename: 'a.png' });
  connection.chat('what is this?', {
    files: [{ type: 'image', transfer_method: 'local_file', upload_file_id: file.id }],
  });
  const raw = await connection.call('app.info');
  console.log(raw, connection.hello?.features.includes('call'));
  // @ts-expect-error: not a call method
  await connection.call('admin.delete_everything');
}
