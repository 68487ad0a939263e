// A Vue app on the SDK's composable (render functions: no template compiler), bundled by
// esbuild in test/browser/bindings.test.mjs.
import { createApp, h, ref } from 'vue';

import { useChat, useTokenwire } from '../../../sdk/vue.js';

const params = new URLSearchParams(location.search);

const App = {
  setup() {
    const connection = useTokenwire({ url: params.get('ws'), user: params.get('user'), storage: null });
    const { messages, busy, connectionState, send, stop, reset } = useChat(connection);
    const query = ref('');
    const submit = (e) => {
      e.preventDefault();
      send(query.value);
      query.value = '';
    };
    return () => h('main', [
      h('p', { 'data-testid': 'state' }, connectionState.value),
      h('form', { onSubmit: submit }, [
        h('input', { 'data-testid': 'question', value: query.value, onInput: (e) => { query.value = e.target.value; } }),
        h('button', { 'data-testid': 'send', disabled: busy.value }, 'Send'),
        h('button', { type: 'button', 'data-testid': 'stop', disabled: !busy.value, onClick: stop }, 'Stop'),
        h('button', { type: 'button', 'data-testid': 'new', onClick: reset }, 'New'),
      ]),
      ...messages.value.map((m) => h('article', { key: m.id, 'data-testid': 'message', 'data-status': m.status, 'data-conversation': m.conversationId ?? '' }, [
        h('h2', m.query),
        h('p', { 'data-testid': 'answer' }, m.text),
      ])),
    ]);
  },
};

createApp(App).mount('#root');
