// Debian's Chromium through playwright-core (never a downloaded browser), and a static HTTP
// server on another port: the "host site" that embeds tokenwire in the widget and hook tests.

import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { extname } from 'node:path';

import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.TOKENWIRE_CHROMIUM ?? '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-gpu',
];

/** Debian's Chromium, headless, with the flags this closed network needs (and `extraArgs`). */
export function launchChromium(extraArgs = []) {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [...CHROMIUM_ARGS, ...extraArgs],
  });
}

/** A page's console errors and uncaught exceptions, for `assert.deepEqual(errors, [])`. */
export function collectErrors(page) {
  const errors = [];
  page.on('pageerror', (err) => errors.push(String(err)));
  page.on('console', (msg) => {
    if (msg.type() === 'error') errors.push(msg.text());
  });
  return errors;
}

const b64url = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');

/** An HS256 JWT for `sub`, valid `ttlS` seconds: what a host site's backend would issue. */
export function hs256(secret, sub, ttlS = 300) {
  const body = `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url({ sub, exp: Math.floor(Date.now() / 1000) + ttlS })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.mjs': 'text/javascript; charset=utf-8', '.css': 'text/css' };

/**
 * A static site on 127.0.0.1:<free port>. `routes` maps a path to a string, a file path
 * ({ file }), or a function (req) => string | { status, body, type }. Counts hits per path.
 */
export async function startSite(routes) {
  const hits = new Map();
  const server = http.createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    hits.set(path, (hits.get(path) ?? 0) + 1);
    let route = routes[path];
    if (typeof route === 'function') route = route(req);
    if (route == null) {
      res.writeHead(404).end('not found');
      return;
    }
    let body = route;
    let type = TYPES[extname(path)] ?? TYPES['.html'];
    let status = 200;
    if (typeof route === 'object' && route.file) {
      body = readFileSync(route.file);
      type = TYPES[extname(route.file)] ?? 'application/octet-stream';
    } else if (typeof route === 'object') {
      ({ body, status = 200 } = route);
      type = route.type ?? type;
    }
    res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' }).end(body);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  return {
    origin: `http://127.0.0.1:${port}`,
    hits,
    close: () => new Promise((r) => server.close(() => r())),
  };
}
