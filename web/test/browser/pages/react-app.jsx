// A React app on the SDK's hook, bundled by esbuild in test/browser/bindings.test.mjs.
import { StrictMode, useState } from 'react';
import { createRoot } from 'react-dom/client';

import { useChat, useTokenwire } from '../../../sdk/react.js';

function App({ url, user }) {
  const connection = useTokenwire({ url, user, storage: null });
  const { messages, busy, connectionState, send, stop, reset } = useChat(connection);
  const [query, setQuery] = useState('');
  return (
    <main>
      <p data-testid="state">{connectionState}</p>
      <form onSubmit={(e) => { e.preventDefault(); send(query); setQuery(''); }}>
        <input data-testid="question" value={query} onChange={(e) => setQuery(e.target.value)} />
        <button data-testid="send" disabled={busy}>Send</button>
        <button type="button" data-testid="stop" disabled={!busy} onClick={stop}>Stop</button>
        <button type="button" data-testid="new" onClick={reset}>New</button>
      </form>
      {messages.map((m) => (
        <article key={m.id} data-testid="message" data-status={m.status} data-conversation={m.conversationId ?? ''}>
          <h2>{m.query}</h2>
          <p data-testid="answer">{m.text}</p>
        </article>
      ))}
    </main>
  );
}

const params = new URLSearchParams(location.search);
createRoot(document.getElementById('root')).render(
  <StrictMode><App url={params.get('ws')} user={params.get('user')} /></StrictMode>,
);
