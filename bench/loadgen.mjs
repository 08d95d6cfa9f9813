// relayd's benchmark load generator: seed-dialect WebSocket clients on Node's raw `net`.
//
// Usage: node loadgen.mjs '<JSON config>'        (bench/run.py builds the config)
//
// Config keys, all modes: mode, host, port, sources (local addresses to connect from, used
// round-robin, so tens of thousands of client sockets do not exhaust one address's ephemeral
// ports), deadline_s (the process exits 2 after it, whatever happens), and port2 (two
// nodes of a cluster, so that every message crosses between them: throughput's receivers,
// and the second client of each latency or chat pair, connect to port2; default: port).
//
//   throughput  pairs, size, window, warmup_s, duration_s
//               `pairs` senders each send to their own receiver; at most `window` messages
//               are in flight to a receiver (sent, not yet received), so the server never
//               holds more than that many for one recipient. Each message received lets its
//               sender send one more: the load is closed-loop and as fast as the server goes.
//   fanin       senders, window, size, warmup_s, duration_s
//               `senders` clients send to ONE receiver, `window` in flight in all, each
//               receipt letting the next sender (round-robin) send one more.
//               Both closed-loop modes stop sending after the measured window; `lost`
//               counts the messages sent that neither arrived nor drew an error frame within
//               drain_s (default 1 s), `error_kinds` every error frame senders got before the
//               clients closed (warm-up included), `errors` those inside the measured window.
//   latency     pairs, rate, size, warmup_s, duration_s, concurrency, settle_s, drain_s, close_s
//   chat        the same keys: open loop, `rate` messages per second in all, evenly spaced,
//               each from one client of a pair to the other (round-robin over the pairs,
//               alternating direction), so every client sends and receives now and then;
//               each payload carries its send time and the receiver computes the one-way
//               latency (sender and receiver share this process's clock). `latency` is the
//               few-pairs case (10), `chat` the many-connections one (thousands): the same
//               code. See paced() below for the timing.
//   idle        count, concurrency, hold_s
//               opens `count` connections (`concurrency` handshakes at a time), prints a
//               `held` line, then holds them until a `release` line on stdin or hold_s, and
//               reports how many the server kept open.
//   connrate    concurrency, warmup_s, duration_s
//               `concurrency` workers each run connections one after another through their
//               whole life: connect, handshake, wait for the id (the welcome), start the
//               closing handshake, wait until the server has closed; reports those cycles
//               per second, and the time to the welcome.
//
// min_count and max_duration_s (every mode but idle; bench/run.py --quick sets them): the
// measured window, duration_s long, stays open until min_count operations (messages
// received, in the closed-loop modes; sent, in the paced ones; connection cycles) have
// completed in it, and at most max_duration_s: a window of a fraction of a second can
// otherwise hold nothing on a busy machine, where a server (or this process) may not run
// at all for that long. Rates stay per second of the window as it was.
//
// Output, JSON lines on stdout: {"event":"measure.start"} and {"event":"measure.end"} as the
// measured window opens and closes (run.py samples the server's CPU time there), {"event":
// "held",...} in idle mode, and last {"event":"result",...}. Every result but idle's carries
// gen_cpu, this process's CPU time over the measured window as a fraction of one core
// (process.cpuUsage), and the paced and connrate modes gen_loop_busy, the share of the window
// its event loop was busy (see Window): they show whether the generator could be the
// bottleneck.
//
// Client frames are masked with the all-zero key (RFC 6455 requires the mask bit; any key is
// valid), so masking costs nothing. Pings are answered; server frames are parsed in place.

import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { Worker } from 'node:worker_threads';

const cfg = JSON.parse(process.argv[2] ?? '{}');
const SOURCES = cfg.sources?.length ? cfg.sources : [undefined];
let sourceIndex = 0;

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(detail) {
  emit({ event: 'error', detail });
  process.exit(1);
}

setTimeout(() => {
  emit({ event: 'error', detail: `deadline of ${cfg.deadline_s} s passed` });
  process.exit(2);
}, (cfg.deadline_s ?? 60) * 1000).unref();

const sleep = (s) => new Promise((resolve) => setTimeout(resolve, s * 1000));
// Seconds a connrate worker waits for the server to close a connection it asked to close.
const CLOSE_WAIT_S = 5;

// -- frames -------------------------------------------------------------------------------

function frameHeader(opcode, length) {
  // FIN + opcode; mask bit + length; then the (zero) masking key.
  if (length < 126) return Buffer.from([0x80 | opcode, 0x80 | length, 0, 0, 0, 0]);
  if (length < 65536) {
    return Buffer.from([0x80 | opcode, 0x80 | 126, length >> 8, length & 0xff, 0, 0, 0, 0]);
  }
  const header = Buffer.alloc(14);
  header[0] = 0x80 | opcode;
  header[1] = 0x80 | 127;
  header.writeBigUInt64BE(BigInt(length), 2);
  return header;
}

function encodeFrame(payload, opcode = 1) {
  const data = typeof payload === 'string' ? Buffer.from(payload) : payload;
  return Buffer.concat([frameHeader(opcode, data.length), data]);
}

const CLOSE_FRAME = encodeFrame(Buffer.from([0x03, 0xe8]), 8); // 1000, no reason

// -- one client ---------------------------------------------------------------------------

// A seed-dialect client. `handlers.onMessage(client, buf, start, end)` gets every text frame
// after the id; `handlers.onData(client)` runs after each chunk from the socket is parsed.
class Client {
  constructor(handlers = {}) {
    this.handlers = handlers;
    this.id = null;
    this.open = false; // handshake done and no close seen yet
    this.closed = false; // the socket has closed
    this.rest = null; // bytes of an incomplete frame
    this.head = null; // bytes of the HTTP response head, until it is complete
    this.fragments = null;
    this.status = null;
  }

  // Resolves with this client once its id has arrived; rejects if it cannot connect.
  connect(host, port) {
    return new Promise((resolve, reject) => {
      this.resolveId = resolve;
      this.rejectId = reject;
      const localAddress = SOURCES[sourceIndex++ % SOURCES.length];
      const sock = net.connect({ host, port, localAddress, noDelay: true });
      this.sock = sock;
      sock.on('connect', () => {
        const key = randomBytes(16).toString('base64');
        sock.write(
          `GET / HTTP/1.1\r\nHost: ${host}:${port}\r\nUpgrade: websocket\r\n` +
            `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
        );
      });
      sock.on('data', (chunk) => this.onChunk(chunk));
      sock.on('error', (err) => this.lost(err.code ?? err.message));
      sock.on('close', () => {
        this.closed = true;
        this.lost('closed');
        this.handlers.onClose?.(this);
      });
    });
  }

  lost(why) {
    this.open = false;
    if (this.rejectId) {
      const reject = this.rejectId;
      this.rejectId = this.resolveId = null;
      reject(new Error(this.status ? `HTTP ${this.status}` : why));
    }
  }

  onChunk(chunk) {
    if (this.id === null && !this.open) {
      this.head = this.head ? Buffer.concat([this.head, chunk]) : chunk;
      const end = this.head.indexOf('\r\n\r\n');
      if (end < 0) return;
      const statusLine = this.head.toString('latin1', 0, this.head.indexOf('\r\n'));
      this.status = statusLine.split(' ')[1];
      if (this.status !== '101') {
        this.sock.destroy();
        return;
      }
      this.open = true;
      chunk = this.head.subarray(end + 4);
      this.head = null;
    }
    this.parse(chunk);
    this.handlers.onData?.(this);
  }

  parse(chunk) {
    const buf = this.rest ? Buffer.concat([this.rest, chunk]) : chunk;
    const n = buf.length;
    let off = 0;
    for (;;) {
      if (n - off < 2) break;
      const b0 = buf[off];
      let len = buf[off + 1] & 0x7f;
      let hdr = 2;
      if (len === 126) {
        if (n - off < 4) break;
        len = buf.readUInt16BE(off + 2);
        hdr = 4;
      } else if (len === 127) {
        if (n - off < 10) break;
        len = Number(buf.readBigUInt64BE(off + 2));
        hdr = 10;
      }
      if (buf[off + 1] & 0x80) hdr += 4; // servers must not mask; skip a key if one does
      if (n - off < hdr + len) break;
      const start = off + hdr;
      off = start + len;
      this.frame(b0 & 0x0f, (b0 & 0x80) !== 0, buf, start, off);
    }
    this.rest = off < n ? buf.subarray(off) : null;
  }

  frame(opcode, fin, buf, start, end) {
    if (opcode === 1 || opcode === 2 || opcode === 0) {
      if (!fin || this.fragments) {
        // A fragmented message (no server here sends one for these sizes): reassemble.
        this.fragments ??= [];
        this.fragments.push(Buffer.from(buf.subarray(start, end)));
        if (!fin) return;
        buf = Buffer.concat(this.fragments);
        this.fragments = null;
        start = 0;
        end = buf.length;
      }
      if (this.id === null) {
        this.id = buf.toString('utf8', start, end);
        const resolve = this.resolveId;
        this.resolveId = this.rejectId = null;
        resolve?.(this);
      } else {
        this.handlers.onMessage?.(this, buf, start, end);
      }
    } else if (opcode === 9) {
      this.sock.write(encodeFrame(Buffer.from(buf.subarray(start, end)), 10)); // pong
    } else if (opcode === 8) {
      if (this.open) this.sock.write(CLOSE_FRAME);
      this.open = false;
      this.sock.end();
    }
  }

  write(data) {
    if (this.open) this.sock.write(data);
  }

  // Start the closing handshake; the server answers and closes the TCP connection first,
  // so TIME_WAIT stays on its side and the client's ports are not used up.
  close() {
    if (this.open) {
      this.open = false;
      this.sock.write(CLOSE_FRAME);
    } else if (!this.closed) {
      this.sock.end();
    }
  }
}

// Open `n` clients, `concurrency` handshakes at a time; returns [clients, failures]. Client
// `index` connects to portOf(index).
async function openMany(
  n,
  concurrency,
  handlers,
  { tolerate = false, portOf = () => cfg.port } = {},
) {
  const clients = [];
  const failures = {};
  let next = 0;
  async function worker() {
    while (next < n) {
      const index = next++;
      const client = new Client(handlers(index));
      try {
        clients[index] = await client.connect(cfg.host, portOf(index));
      } catch (err) {
        if (!tolerate) fail(`connection ${index} failed: ${err.message}`);
        failures[err.message] = (failures[err.message] ?? 0) + 1;
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, worker));
  return [clients.filter(Boolean), failures];
}

// Close every client and wait (bounded) until the server has closed them all.
async function closeAll(clients, timeout_s = 5) {
  const pending = clients.filter((c) => !c.closed);
  const done = Promise.all(
    pending.map((c) => new Promise((resolve) => c.sock.once('close', resolve))),
  );
  for (const c of pending) c.close();
  await Promise.race([done, sleep(timeout_s)]);
  for (const c of clients) if (!c.closed) c.sock.destroy();
}

// -- measurement ----------------------------------------------------------------------------

// CPU and wall time between start() and stop(), and the window's edges announced on stdout.
// gen_cpu is this process's CPU time (all its threads) as a share of one core; loop_busy the
// share of the time the main thread's event loop was not waiting for events (Node's event
// loop utilisation): near 1, messages wait for the generator, not for the server.
class Window {
  start() {
    this.t0 = performance.now();
    this.cpu0 = process.cpuUsage();
    this.elu0 = performance.eventLoopUtilization();
    emit({ event: 'measure.start' });
  }

  stop() {
    this.t1 = performance.now();
    const cpu = process.cpuUsage(this.cpu0);
    this.loop_busy = performance.eventLoopUtilization(this.elu0).utilization;
    emit({ event: 'measure.end' });
    this.wall_s = (this.t1 - this.t0) / 1000;
    this.gen_cpu = (cpu.user + cpu.system) / 1e6 / this.wall_s;
  }
}

// The measured window's length: duration_s, then until min_count operations have been
// counted in it (add()), for max_duration_s in all at most. Only what is added after
// window() began counts.
class Counted {
  constructor() {
    this.count = 0;
    this.wanted = Infinity;
    this.reached = null;
  }

  add(n) {
    this.count += n;
    if (this.count >= this.wanted) this.reached?.();
  }

  async window() {
    const began = performance.now();
    this.count = 0;
    await sleep(cfg.duration_s);
    const min = cfg.min_count ?? 0;
    const left = (cfg.max_duration_s ?? cfg.duration_s) - (performance.now() - began) / 1000;
    if (this.count >= min || left <= 0) return;
    const enough = new Promise((resolve) => {
      this.reached = resolve;
      this.wanted = min;
    });
    await Promise.race([enough, sleep(left)]);
    this.wanted = Infinity;
    this.reached = null;
  }
}

function percentile(sorted, q) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
}

function message(size, prefix = '') {
  return prefix + 'x'.repeat(Math.max(0, size - prefix.length));
}

// -- modes ------------------------------------------------------------------------------------

// Closed-loop load: each receipt at a receiver lets one of its feeders send one more.
async function closedLoop({ receivers: nReceivers, feeders, window, size }) {
  const text = message(size);
  let received = 0;
  let errors = 0;
  let stopped = false;
  const counted = new Counted();
  const errorKinds = {};
  // Per receiver: the senders that feed it, a round-robin cursor and unspent credits.
  const routes = [];
  const flush = (route) => {
    if (stopped || route === undefined || route.credit === 0) return;
    const counts = new Map();
    for (; route.credit > 0; route.credit--) {
      const sender = route.senders[route.cursor++ % route.senders.length];
      counts.set(sender, (counts.get(sender) ?? 0) + 1);
    }
    for (const [sender, k] of counts) sender.write(sender.frames[k]);
  };
  const [receivers] = await openMany(
    nReceivers,
    64,
    (i) => ({
      onMessage() {
        received++;
        counted.add(1);
        routes[i].credit++;
      },
      onData() {
        flush(routes[i]);
      },
    }),
    { portOf: () => cfg.port2 ?? cfg.port },
  );
  const [senders] = await openMany(nReceivers * feeders, 64, (i) => ({
    onMessage(_client, buf, start, end) {
      // Senders receive nothing but error frames; give the window back so load continues.
      errors++;
      const kind = buf.toString('utf8', start, Math.min(end, start + 80));
      errorKinds[kind] = (errorKinds[kind] ?? 0) + 1;
      routes[Math.floor(i / feeders)].credit++;
    },
    onData() {
      flush(routes[Math.floor(i / feeders)]);
    },
  }));
  receivers.forEach((receiver, r) => {
    const group = senders.slice(r * feeders, (r + 1) * feeders);
    const frame = encodeFrame(JSON.stringify({ to: receiver.id, message: text }));
    for (const sender of group) {
      sender.frames = [null];
      for (let k = 1; k <= window; k++) sender.frames.push(Buffer.concat(Array(k).fill(frame)));
    }
    routes.push({ senders: group, cursor: 0, credit: window });
  });
  for (const route of routes) flush(route);
  await sleep(cfg.warmup_s);
  const w = new Window();
  const before = [received, errors];
  w.start();
  await counted.window();
  w.stop();
  const count = received - before[0];
  const windowErrors = errors - before[1];
  stopped = true;
  // No more sends: once every message in flight has arrived (or been answered with an error
  // frame) each route's credit is back to the full window. What is missing drain_s later is
  // lost.
  const settle = performance.now() + (cfg.drain_s ?? 1) * 1000;
  while (routes.some((r) => r.credit < window) && performance.now() < settle) await sleep(0.005);
  const lost = routes.reduce((n, r) => n + window - r.credit, 0);
  const lostConnections = [...receivers, ...senders].filter((c) => !c.open).length;
  // Error frames from here on are the shutdown's: closing everyone at once can leave a
  // sender's last frames addressed to a receiver that has already gone.
  const kinds = { ...errorKinds };
  await closeAll([...receivers, ...senders]);
  return {
    msgs_per_s: count / w.wall_s,
    received: count,
    lost,
    errors: windowErrors,
    error_kinds: kinds,
    lost_connections: lostConnections,
    wall_s: w.wall_s,
    gen_cpu: w.gen_cpu,
  };
}

// Paced (open-loop) load, for the latency and chat modes: `rate` messages per second in all,
// evenly spaced, from one process. Message k goes over pair k mod P (round-robin), from its
// first client to its second on even rounds over the pairs and back on odd ones, so every
// client both sends and receives, each once every 2P/rate seconds: with thousands of pairs
// no client has two messages in flight and nearly every message reaches the server alone.
//
// Timing. Node's timers have millisecond granularity, too coarse to space 10,000 messages a
// second. A pacer thread (PACER below) sleeps in Atomics.wait, which wakes to within tens of
// microseconds, until each send is due, and then wakes this thread with a message; this
// thread's event loop never blocks, so a delivery is read as soon as it arrives, and the
// sender and the receiver of a message share one clock. If this thread is late (busy), it
// sends everything due at once and the lag shows in send_lag_p99_us. Each payload starts
// with its send time, process.hrtime (CLOCK_MONOTONIC) in ns since `epoch`, in digits: a
// frame that starts with a digit is a delivery, anything else an error frame.
//
// The measured window is [from, to) on the send clock; a message belongs to it by its stamp.
// After it, deliveries are awaited as long as they keep coming (see `drain_s`, `settle_s`).
//
// flag[0] is 1 while a wake-up is pending; flag[1] becomes 1 when the main thread ends the
// window before `end` (min_count reached): the pacer sleeps on it, so it stops at once.
const PACER = `
const { parentPort, workerData } = require('node:worker_threads');
const { epoch, begin, intervalNs, end, pending } = workerData;
const flag = new Int32Array(pending);
const nowNs = () => Number(process.hrtime.bigint() - BigInt(epoch));
const stopped = () => Atomics.load(flag, 1) !== 0;
let due = begin;
while (due < end && !stopped()) {
  const gap = due - nowNs();
  if (gap > 0) {
    Atomics.wait(flag, 1, 0, gap / 1e6);
    continue;
  }
  // One wake-up at a time: while one is pending, the main thread will send what is due anyway.
  if (Atomics.compareExchange(flag, 0, 0, 1) === 0) parentPort.postMessage(0);
  due += intervalNs;
}
while (nowNs() < end && !stopped()) Atomics.wait(flag, 1, 0, (end - nowNs()) / 1e6);
parentPort.postMessage(1);
`;

async function paced() {
  const epoch = process.hrtime.bigint();
  const nowNs = () => Number(process.hrtime.bigint() - epoch);
  const latencies = [];
  let errors = 0;
  let inWindowErrors = 0;
  let span = [Infinity, Infinity];
  const errorKinds = {};
  const handlers = () => ({
    onMessage(_client, buf, start, end) {
      let stamp = 0;
      let i = start;
      for (; i < end; i++) {
        const d = buf[i] - 48;
        if (d < 0 || d > 9) break;
        stamp = stamp * 10 + d;
      }
      if (i === start) {
        errors++;
        const now = nowNs();
        if (now >= span[0] && now < span[1]) inWindowErrors++;
        const kind = buf.toString('utf8', start, Math.min(end, start + 80));
        errorKinds[kind] = (errorKinds[kind] ?? 0) + 1;
        return;
      }
      if (stamp >= span[0] && stamp < span[1]) latencies.push(nowNs() - stamp);
    },
  });
  const t0 = performance.now();
  const [clients] = await openMany(2 * cfg.pairs, cfg.concurrency ?? 64, handlers, {
    portOf: (index) => (index % 2 === 1 ? (cfg.port2 ?? cfg.port) : cfg.port),
  });
  const openS = (performance.now() - t0) / 1000;
  const pairs = cfg.pairs;
  // Client `leg` sends with prefixes[leg]: 2p to 2p + 1 (the pair's first to its second), and
  // 2p + 1 back to 2p.
  const prefixes = [];
  for (let p = 0; p < pairs; p++) {
    prefixes.push(`{"to":${JSON.stringify(clients[2 * p + 1].id)},"message":"`);
    prefixes.push(`{"to":${JSON.stringify(clients[2 * p].id)},"message":"`);
  }
  const pad = 'x'.repeat(cfg.size);
  const intervalNs = 1e9 / cfg.rate;
  const begin = nowNs() + 1e6; // the pacer thread starts meanwhile
  const from = begin + cfg.warmup_s * 1e9;
  // The window ends at `least`, or later once min_count messages were sent in it: `to` is
  // its latest end until the main thread closes it (below).
  const least = from + cfg.duration_s * 1e9;
  let to = from + Math.max(cfg.duration_s, cfg.max_duration_s ?? 0) * 1e9;
  span = [from, to];
  const lags = [];
  const w = new Window();
  let k = 0;
  let sent = 0;
  let finished;
  const done = new Promise((resolve) => {
    finished = resolve;
  });
  const pending = new SharedArrayBuffer(8);
  const flag = new Int32Array(pending);
  const pacer = new Worker(PACER, {
    eval: true,
    workerData: { epoch: epoch.toString(), begin, intervalNs, end: to, pending },
  });
  pacer.on('error', (err) => fail(`pacer: ${err.message}`));
  pacer.on('message', (last) => {
    Atomics.store(flag, 0, 0);
    let now = nowNs();
    for (let due = begin + k * intervalNs; due <= now && due < to; due = begin + k * intervalNs) {
      const pair = k % pairs;
      const leg = 2 * pair + (Math.floor(k / pairs) % 2);
      const stamp = String(now);
      clients[leg].write(encodeFrame(prefixes[leg] + stamp + pad.slice(stamp.length) + '"}'));
      if (now >= from && now < to) {
        if (w.t0 === undefined) w.start();
        sent++;
        lags.push(now - due);
      }
      k++;
      now = nowNs();
    }
    if (!last && to > least && now >= least && sent >= (cfg.min_count ?? 0)) {
      to = now; // nothing sent from here on is in the window, or sent at all
      span[1] = to;
      Atomics.store(flag, 1, 1);
      Atomics.notify(flag, 1);
    }
    if (last) {
      if (w.t0 === undefined) w.start(); // nothing was sent: an empty window
      w.stop();
      pacer.unref();
      finished();
    }
  });
  await done;
  // A server that fell behind is still delivering: wait while deliveries keep coming (a gap
  // of settle_s ends the wait), for drain_s at most. What has not arrived then is lost.
  const cap = performance.now() + (cfg.drain_s ?? 10) * 1000;
  let seen = -1;
  let progress = performance.now();
  while (latencies.length < sent) {
    const now = performance.now();
    if (latencies.length !== seen) [seen, progress] = [latencies.length, now];
    if (now - progress > (cfg.settle_s ?? 1) * 1000 || now > cap) break;
    await sleep(0.01);
  }
  const lostConnections = clients.filter((c) => !c.open).length;
  await closeAll(clients, cfg.close_s ?? 5);
  const measured = latencies;
  measured.sort((a, b) => a - b);
  lags.sort((a, b) => a - b);
  const us = (ns) => (ns === null ? null : ns / 1000);
  return {
    connections: clients.length,
    open_s: openS,
    target_rate: cfg.rate,
    achieved_rate: sent / w.wall_s,
    sent,
    received: measured.length,
    lost: sent - measured.length,
    errors: inWindowErrors,
    error_kinds: errorKinds,
    all_errors: errors,
    lost_connections: lostConnections,
    p50_us: us(percentile(measured, 0.5)),
    p99_us: us(percentile(measured, 0.99)),
    p999_us: us(percentile(measured, 0.999)),
    max_us: us(measured.length ? measured[measured.length - 1] : null),
    send_lag_p99_us: us(percentile(lags, 0.99)),
    wall_s: w.wall_s,
    gen_cpu: w.gen_cpu,
    gen_loop_busy: w.loop_busy,
  };
}

async function idle() {
  const t0 = performance.now();
  const [clients, failures] = await openMany(cfg.count, cfg.concurrency, () => ({}), {
    tolerate: true,
  });
  const openS = (performance.now() - t0) / 1000;
  emit({ event: 'held', open: clients.length, failures, open_s: openS });
  const released = new Promise((resolve) => {
    const rl = createInterface({ input: process.stdin });
    rl.on('line', (line) => line.trim() === 'release' && resolve());
    rl.on('close', resolve);
  });
  await Promise.race([released, sleep(cfg.hold_s)]);
  process.stdin.destroy();
  const held = clients.filter((c) => c.open).length;
  await closeAll(clients, 10);
  return {
    requested: cfg.count,
    opened: clients.length,
    held,
    failures,
    open_s: openS,
    opens_per_s: clients.length / openS,
  };
}

// A connection's whole life, one after another per worker: connect, handshake, wait for the
// id, start the closing handshake and wait until the server has closed the TCP connection.
// A cycle counts when it completes inside the measured window.
async function connrate() {
  let cycles = 0;
  let failed = 0;
  const failures = {};
  const handshakes = [];
  const lifetimes = [];
  let running = true;
  let measuring = false;
  const counted = new Counted();
  const failure = (why) => {
    failed++;
    failures[why] = (failures[why] ?? 0) + 1;
  };
  async function worker() {
    while (running) {
      const client = new Client();
      const t = performance.now();
      try {
        await client.connect(cfg.host, cfg.port);
      } catch (err) {
        failure(err.message);
        await sleep(0.001);
        continue;
      }
      const welcomed = performance.now();
      const closed = new Promise((resolve) => client.sock.once('close', resolve));
      client.close();
      await Promise.race([closed, sleep(CLOSE_WAIT_S)]);
      if (!client.closed) {
        failure(`not closed within ${CLOSE_WAIT_S} s`);
        client.sock.destroy();
        continue;
      }
      if (measuring) {
        cycles++;
        counted.add(1);
        handshakes.push((welcomed - t) * 1000);
        lifetimes.push((performance.now() - t) * 1000);
      }
    }
  }
  const workers = Array.from({ length: cfg.concurrency }, worker);
  await sleep(cfg.warmup_s);
  const w = new Window();
  measuring = true;
  w.start();
  await counted.window();
  w.stop();
  measuring = false;
  running = false;
  await Promise.all(workers);
  handshakes.sort((a, b) => a - b);
  lifetimes.sort((a, b) => a - b);
  return {
    opens_per_s: cycles / w.wall_s,
    opened: cycles,
    failed,
    failures,
    handshake_p50_us: percentile(handshakes, 0.5),
    handshake_p99_us: percentile(handshakes, 0.99),
    cycle_p50_us: percentile(lifetimes, 0.5),
    cycle_p99_us: percentile(lifetimes, 0.99),
    wall_s: w.wall_s,
    gen_cpu: w.gen_cpu,
    gen_loop_busy: w.loop_busy,
  };
}

const modes = {
  throughput: () =>
    closedLoop({ receivers: cfg.pairs, feeders: 1, window: cfg.window, size: cfg.size }),
  fanin: () =>
    closedLoop({ receivers: 1, feeders: cfg.senders, window: cfg.window, size: cfg.size }),
  latency: paced,
  chat: paced,
  idle,
  connrate,
};

if (!(cfg.mode in modes)) fail(`unknown mode ${JSON.stringify(cfg.mode)}`);
const result = await modes[cfg.mode]();
emit({ event: 'result', mode: cfg.mode, ...result });
process.exit(0);
