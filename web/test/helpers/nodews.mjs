// A minimal RFC 6455 WebSocket client for Node tests, with the browser WebSocket's shape
// (constructor(url, protocols), send, close, onopen/onmessage/onclose/onerror).
//
// Node 20 has no WebSocket without a flag, and the SDK must not depend on a package, so the
// SDK-over-a-real-gateway tests use this: text frames, fragmentation, ping/pong and close.
// `terminate()` resets the TCP connection, which is what a network failure looks like.

import { randomBytes, createHash } from 'node:crypto';
import http from 'node:http';

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

export class NodeWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  constructor(url, protocols = []) {
    this.url = url;
    this.readyState = NodeWebSocket.CONNECTING;
    this.protocol = '';
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this._socket = null;
    this._buffer = Buffer.alloc(0);
    this._fragments = [];
    this._closeSent = false;
    this._closeEmitted = false;
    const list = typeof protocols === 'string' ? [protocols] : protocols;
    const key = randomBytes(16).toString('base64');
    const target = new URL(url);
    const request = http.request({
      host: target.hostname,
      port: target.port || 80,
      path: target.pathname + target.search,
      headers: {
        Connection: 'Upgrade',
        Upgrade: 'websocket',
        'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': key,
        ...(list.length ? { 'Sec-WebSocket-Protocol': list.join(', ') } : {}),
      },
    });
    request.on('upgrade', (response, socket, head) => {
      const accept = createHash('sha1').update(key + GUID).digest('base64');
      if (response.headers['sec-websocket-accept'] !== accept) {
        socket.destroy();
        this._fail();
        return;
      }
      this.protocol = response.headers['sec-websocket-protocol'] ?? '';
      this._socket = socket;
      socket.setNoDelay(true);
      socket.on('data', (chunk) => this._onData(chunk));
      socket.on('close', () => this._emitClose(1006, ''));
      socket.on('error', () => {});
      this.readyState = NodeWebSocket.OPEN;
      this.onopen?.({});
      if (head && head.length) this._onData(head);
    });
    request.on('response', (response) => {
      response.resume();
      this._fail();
    });
    request.on('error', () => this._fail());
    request.end();
  }

  send(data) {
    if (this.readyState !== NodeWebSocket.OPEN) throw new Error('WebSocket is not open');
    this._write(0x1, Buffer.from(String(data), 'utf8'));
  }

  close(code = 1000, reason = '') {
    if (this.readyState >= NodeWebSocket.CLOSING) return;
    if (!this._socket) {
      this._fail();
      return;
    }
    this.readyState = NodeWebSocket.CLOSING;
    const payload = Buffer.alloc(2 + Buffer.byteLength(reason));
    payload.writeUInt16BE(code, 0);
    payload.write(reason, 2);
    this._write(0x8, payload);
    this._closeSent = true;
    setTimeout(() => this._socket?.destroy(), 1000).unref();
  }

  /** Reset the TCP connection without a close frame (the peer sees an abnormal close). */
  terminate() {
    if (this._socket) {
      if (this._socket.resetAndDestroy) this._socket.resetAndDestroy();
      else this._socket.destroy();
    } else {
      this._fail();
    }
  }

  _fail() {
    this.onerror?.({});
    this._emitClose(1006, '');
  }

  _emitClose(code, reason) {
    if (this._closeEmitted) return;
    this._closeEmitted = true;
    this.readyState = NodeWebSocket.CLOSED;
    this._socket?.destroy();
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }

  _write(opcode, payload) {
    if (!this._socket || this._socket.destroyed) return;
    const mask = randomBytes(4);
    let header;
    if (payload.length < 126) {
      header = Buffer.alloc(2);
      header[1] = 0x80 | payload.length;
    } else if (payload.length < 65536) {
      header = Buffer.alloc(4);
      header[1] = 0x80 | 126;
      header.writeUInt16BE(payload.length, 2);
    } else {
      header = Buffer.alloc(10);
      header[1] = 0x80 | 127;
      header.writeBigUInt64BE(BigInt(payload.length), 2);
    }
    header[0] = 0x80 | opcode;
    const masked = Buffer.alloc(payload.length);
    for (let i = 0; i < payload.length; i += 1) masked[i] = payload[i] ^ mask[i & 3];
    this._socket.write(Buffer.concat([header, mask, masked]));
  }

  _onData(chunk) {
    this._buffer = Buffer.concat([this._buffer, chunk]);
    for (;;) {
      if (this._buffer.length < 2) return;
      const fin = (this._buffer[0] & 0x80) !== 0;
      const opcode = this._buffer[0] & 0x0f;
      let length = this._buffer[1] & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (this._buffer.length < 4) return;
        length = this._buffer.readUInt16BE(2);
        offset = 4;
      } else if (length === 127) {
        if (this._buffer.length < 10) return;
        length = Number(this._buffer.readBigUInt64BE(2));
        offset = 10;
      }
      if (this._buffer.length < offset + length) return;
      const payload = this._buffer.subarray(offset, offset + length);
      this._buffer = this._buffer.subarray(offset + length);
      this._onFrame(fin, opcode, Buffer.from(payload));
    }
  }

  _onFrame(fin, opcode, payload) {
    if (opcode === 0x1 || opcode === 0x2 || opcode === 0x0) {
      this._fragments.push(payload);
      if (!fin) return;
      const data = Buffer.concat(this._fragments);
      this._fragments = [];
      if (this.readyState === NodeWebSocket.OPEN) this.onmessage?.({ data: data.toString('utf8') });
    } else if (opcode === 0x8) {
      const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      const reason = payload.length > 2 ? payload.subarray(2).toString('utf8') : '';
      if (!this._closeSent) {
        this._write(0x8, payload.subarray(0, 2));
        this._closeSent = true;
      }
      this._emitClose(code, reason);
    } else if (opcode === 0x9) {
      this._write(0xa, payload);
    }
  }
}
