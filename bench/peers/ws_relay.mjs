// The seed post's relay (docs/protocol.md, "The seed dialect"), on Node's `ws`, corrected.
//
// Usage: node ws_relay.mjs [PORT] [HOST]     (PORT 0, the default, picks a free port)
//
// The post's design: a table of open sockets keyed by id; the first frame a client gets is its
// id; a client sends {"to": id, "message": m} and the recipient gets m itself if it is a
// string, else its JSON. Corrected where the post's server crashed or could be abused:
//   - ids are 128 random bits (base64url), not the client-chosen Sec-WebSocket-Key;
//   - bad JSON, a bad envelope, an unknown recipient or a binary frame get an error frame
//     ({"error": code, "detail": ...}) instead of throwing out of the event handler;
//   - a socket leaves the table when it closes; socket errors are handled;
//   - a recipient whose unsent bytes exceed MAX_BUFFERED_BYTES gets no more (recipient_busy),
//     so one stalled reader cannot grow this process's memory without bound.
// No per-message logging, no rate limits: this is the yardstick, not a product.
//
// Prints one JSON line {"event": "server.ready", "port": N} on stdout once listening.

import { randomBytes } from 'node:crypto';
import { WebSocketServer } from 'ws';

const port = Number(process.argv[2] ?? 0);
const host = process.argv[3] ?? '127.0.0.1';
const MAX_PAYLOAD_BYTES = 65536; // relayd's default limits.max_message_bytes
const MAX_BUFFERED_BYTES = 1 << 20;

const sockets = new Map();
const errorFrame = (error, detail) => JSON.stringify({ error, detail });

const server = new WebSocketServer({
  host,
  port,
  perMessageDeflate: false,
  clientTracking: false,
  maxPayload: MAX_PAYLOAD_BYTES,
});

server.on('connection', (ws) => {
  const id = randomBytes(16).toString('base64url');
  sockets.set(id, ws);
  ws.send(id);
  ws.on('message', (data, isBinary) => {
    if (isBinary) {
      ws.send(errorFrame('unsupported_data', 'binary frames are not relayed'));
      return;
    }
    let envelope;
    try {
      envelope = JSON.parse(data);
    } catch {
      ws.send(errorFrame('invalid_json', 'the frame is not JSON'));
      return;
    }
    if (
      envelope === null ||
      typeof envelope !== 'object' ||
      typeof envelope.to !== 'string' ||
      !('message' in envelope)
    ) {
      ws.send(errorFrame('invalid_envelope', 'expected {"to": id, "message": ...}'));
      return;
    }
    const recipient = sockets.get(envelope.to);
    if (recipient === undefined) {
      ws.send(errorFrame('unknown_recipient', 'no client has that id'));
      return;
    }
    if (recipient.bufferedAmount > MAX_BUFFERED_BYTES) {
      ws.send(errorFrame('recipient_busy', 'the recipient is not reading'));
      return;
    }
    const m = envelope.message;
    recipient.send(typeof m === 'string' ? m : JSON.stringify(m));
  });
  ws.on('close', () => sockets.delete(id));
  ws.on('error', () => ws.terminate());
});

server.on('listening', () => {
  process.stdout.write(
    JSON.stringify({ event: 'server.ready', port: server.address().port }) + '\n',
  );
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
