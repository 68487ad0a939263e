// The SDK as the npm package @tokenwire/client (web/sdk/package.json): `npm pack` holds every
// module with its .d.ts and the README, and nothing else; installed offline from the tarball
// into a fresh project, each export imports in Node (react and vue linked in as the app's own).

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';

import { WEB_DIR } from './helpers/stack.mjs';

const SDK = join(WEB_DIR, 'sdk');
const dir = mkdtempSync(join(tmpdir(), 'tw-npm-'));
after(() => rmSync(dir, { recursive: true, force: true }));

const npm = (args, cwd) => execFileSync('npm', [...args, '--no-audit', '--no-fund', '--loglevel=error'], { cwd, encoding: 'utf8' });

test('npm pack, install the tarball offline, import every export', () => {
  const [packed] = JSON.parse(npm(['pack', SDK, '--pack-destination', dir, '--json'], dir));
  assert.equal(packed.name, '@tokenwire/client');
  const files = packed.files.map((f) => f.path).sort();
  const modules = readdirSync(SDK).filter((f) => f.endsWith('.js')).sort();
  for (const js of modules) {
    assert.ok(files.includes(js), `${js} is in the tarball`);
    assert.ok(files.includes(js.replace(/\.js$/, '.d.ts')), `${js}'s .d.ts is in the tarball`);
  }
  assert.ok(files.includes('README.md') && files.includes('package.json'));
  assert.deepEqual(files.filter((f) => !/\.(js|d\.ts)$/.test(f)), ['README.md', 'package.json'], 'nothing else');

  const app = join(dir, 'app');
  mkdirSync(join(app, 'node_modules'), { recursive: true });
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  npm(['install', '--offline', join(dir, packed.filename)], app);
  // The app's own react and vue (the package's optional peers), from web/'s devDependencies.
  for (const peer of ['react', 'vue']) symlinkSync(join(WEB_DIR, 'node_modules', peer), join(app, 'node_modules', peer), 'dir');

  const check = `
    const sdk = await import('@tokenwire/client');
    const chat = await import('@tokenwire/client/chat');
    const markdown = await import('@tokenwire/client/markdown');
    const react = await import('@tokenwire/client/react');
    const vue = await import('@tokenwire/client/vue');
    const types = (await import('node:fs')).readdirSync('node_modules/@tokenwire/client').filter((f) => f.endsWith('.d.ts'));
    console.log(JSON.stringify({
      connection: typeof sdk.Connection, closePolicy: sdk.closePolicy(4001),
      session: typeof chat.ChatSession, markdown: markdown.renderMarkdown('**x**'),
      react: [typeof react.useTokenwire, typeof react.useChat], vue: [typeof vue.useTokenwire, typeof vue.useChat],
      types: types.sort(),
    }));`;
  const got = JSON.parse(execFileSync(process.execPath, ['--input-type=module', '-e', check], { cwd: app, encoding: 'utf8' }));
  assert.equal(got.connection, 'function');
  assert.equal(got.closePolicy, 'give_up');
  assert.equal(got.session, 'function');
  assert.match(got.markdown, /<strong>x<\/strong>/);
  assert.deepEqual(got.react, ['function', 'function']);
  assert.deepEqual(got.vue, ['function', 'function']);
  assert.deepEqual(got.types, modules.map((m) => m.replace(/\.js$/, '.d.ts')));
});
