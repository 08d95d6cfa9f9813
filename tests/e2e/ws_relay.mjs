// Drive relayd with the Node `ws` client (npm package `ws`, not ours).
//
// Usage: node ws_relay.mjs ws://127.0.0.1:PORT
//
// Opens seed-dialect and relayd.v1 clients, relays messages between them in every
// combination, and prints ONE JSON object on stdout with what each client received (raw
// text frames, unparsed). test_node_ws.py makes the assertions; this script only records.
// Exits 2 on its own deadline so a silent server cannot hang the test.

import WebSocket from 'ws';

const url = process.argv[2];
const DEADLINE_MS = 20000;
setTimeout(() => {
  console.error(`ws_relay.mjs: deadline of ${DEADLINE_MS} ms passed`);
  process.exit(2);
}, DEADLINE_MS).unref();

// Open a client; resolve once open, with a FIFO of its text frames so none is missed.
function open(protocols) {
  return new Promise((resolve, reject) => {
    const ws = protocols ? new WebSocket(url, protocols) : new WebSocket(url);
    const frames = [];
    const waiters = [];
    ws.on('message', (data, isBinary) => {
      const frame = isBinary ? { binary: data.toString('base64') } : data.toString('utf8');
      const waiter = waiters.shift();
      if (waiter) waiter(frame);
      else frames.push(frame);
    });
    const closed = new Promise((done) => ws.on('close', (code) => done(code)));
    ws.once('error', reject);
    ws.once('open', () =>
      resolve({
        ws,
        closed,
        // The next frame received, in order.
        next: () =>
          frames.length > 0
            ? Promise.resolve(frames.shift())
            : new Promise((res) => waiters.push(res)),
        send: (value) => ws.send(JSON.stringify(value)),
      }),
    );
  });
}

const seedA = await open();
const seedB = await open();
const v1C = await open(['relayd.v1']);
const v1D = await open(['relayd.v1']);

const result = {
  protocols: { seedA: seedA.ws.protocol, v1C: v1C.ws.protocol },
  ids: {},
  seed: {},
  v1: {},
  cross: {},
};

// Seed dialect: the first frame is the bare id.
const idA = await seedA.next();
const idB = await seedB.next();
result.ids.seedA = idA;
result.ids.seedB = idB;
// relayd.v1: the first frame is a welcome envelope; record it raw.
const welcomeC = await v1C.next();
const welcomeD = await v1D.next();
result.ids.v1CWelcome = welcomeC;
result.ids.v1DWelcome = welcomeD;
const idC = JSON.parse(welcomeC).id;
const idD = JSON.parse(welcomeD).id;

// seed <-> seed
seedA.send({ to: idB, message: 'hello from node A' });
result.seed.bGot = await seedB.next();
seedB.send({ to: idA, message: { reply: 'from node B', n: [1, 2, 3] } });
result.seed.aGot = await seedA.next();
seedA.send({ to: 'no-such-id-000000000000000000', message: 'lost' });
result.seed.aUnknown = await seedA.next();

// v1 <-> v1, with refs
v1C.send({ to: idD, message: { hello: 'v1' }, ref: 'node-1' });
result.v1.cAck = await v1C.next();
result.v1.dGot = await v1D.next();
v1D.send({ to: idC, message: 'back at you', ref: 2 });
result.v1.dAck = await v1D.next();
result.v1.cGot = await v1C.next();
v1C.send({ to: 'no-such-id-000000000000000000', message: 'lost', ref: 'node-2' });
result.v1.cUnknown = await v1C.next();

// seed -> v1 and v1 -> seed
seedA.send({ to: idD, message: 'seed to v1' });
result.cross.dGot = await v1D.next();
v1D.send({ to: idA, message: { v1: 'to seed' }, ref: 'node-3' });
result.cross.dAck = await v1D.next();
result.cross.aGot = await seedA.next();

// Close every client normally and record the close code each one saw.
const clients = { seedA, seedB, v1C, v1D };
for (const c of Object.values(clients)) c.ws.close(1000, 'done');
result.closeCodes = Object.fromEntries(
  await Promise.all(Object.entries(clients).map(async ([name, c]) => [name, await c.closed])),
);

process.stdout.write(JSON.stringify(result) + '\n');
