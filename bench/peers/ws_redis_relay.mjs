// The seed post's relay scaled the way a Node shop would: Node `ws` nodes sharing one Redis
// through pub/sub, a channel per client id (Socket.IO's redis adapter in its
// "dynamic-private" mode, Centrifugo's personal channels). The yardstick for relayd's
// cluster in bench/run.py.
//
// Usage: node ws_redis_relay.mjs PORT HOST REDIS_URL     (PORT 0 picks a free port)
//
// As bench/peers/ws_relay.mjs (corrected seed relay, seed dialect), plus:
//   - each connection's id is subscribed (channel peer:id:<id>) before its id frame goes
//     out, so it is reachable from every node from its first frame on;
//   - a message for an id held here is sent directly; any other is published on the
//     recipient's channel, and a PUBLISH that reached nobody gets unknown_recipient;
//   - what arrives on a subscribed channel goes to the connection holding that id, unless
//     its unsent bytes exceed MAX_BUFFERED_BYTES (then it is dropped: nobody is told,
//     as a fire-and-forget pub/sub relay does);
//   - ioredis with auto-pipelining: commands issued in one tick share a write.
// No acks across nodes, no per-message logging, no probes: the yardstick, not a product.
//
// Prints one JSON line {"event": "server.ready", "port": N} on stdout once listening.

import { randomBytes } from 'node:crypto';
import Redis from 'ioredis';
import { WebSocketServer } from 'ws';

const port = Number(process.argv[2] ?? 0);
const host = process.argv[3] ?? '127.0.0.1';
const redisUrl = process.argv[4] ?? 'redis://127.0.0.1:6379/0';
const MAX_PAYLOAD_BYTES = 65536;
const MAX_BUFFERED_BYTES = 1 << 20;
const PREFIX = 'peer:id:';

const publisher = new Redis(redisUrl, { enableAutoPipelining: true });
const subscriber = new Redis(redisUrl);
const sockets = new Map();
const errorFrame = (error, detail) => JSON.stringify({ error, detail });

subscriber.on('messageBuffer', (channel, message) => {
  const recipient = sockets.get(channel.toString().slice(PREFIX.length));
  if (recipient !== undefined && recipient.bufferedAmount <= MAX_BUFFERED_BYTES) {
    recipient.send(message, { binary: false });
  }
});

const server = new WebSocketServer({
  host,
  port,
  perMessageDeflate: false,
  clientTracking: false,
  maxPayload: MAX_PAYLOAD_BYTES,
});

server.on('connection', async (ws) => {
  const id = randomBytes(16).toString('base64url');
  sockets.set(id, ws);
  ws.on('close', () => {
    sockets.delete(id);
    subscriber.unsubscribe(PREFIX + id).catch(() => {});
  });
  ws.on('error', () => {});
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
    const m = envelope.message;
    const text = typeof m === 'string' ? m : JSON.stringify(m);
    const recipient = sockets.get(envelope.to);
    if (recipient !== undefined) {
      if (recipient.bufferedAmount > MAX_BUFFERED_BYTES) {
        ws.send(errorFrame('recipient_busy', 'the recipient is not reading'));
      } else {
        recipient.send(text);
      }
      return;
    }
    publisher.publish(PREFIX + envelope.to, text).then(
      (receivers) => {
        if (receivers === 0) ws.send(errorFrame('unknown_recipient', 'no client has that id'));
      },
      () => ws.send(errorFrame('unreachable', 'redis is not reachable')),
    );
  });
  try {
    await subscriber.subscribe(PREFIX + id);
  } catch {
    ws.close(1011, 'redis is not reachable');
    return;
  }
  ws.send(id);
});

server.on('listening', () => {
  process.stdout.write(
    JSON.stringify({ event: 'server.ready', port: server.address().port }) + '\n',
  );
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
