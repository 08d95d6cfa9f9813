// relayd's benchmark load generator: seed-dialect WebSocket clients on Node's raw `net`.
//
// Usage: node loadgen.mjs '<JSON config>'        (bench/run.py builds the config)
//
// Config keys, all modes: mode, host, port, sources (local addresses to connect from, used
// round-robin, so tens of thousands of client sockets do not exhaust one address's ephemeral
// ports), deadline_s (the process exits 2 after it, whatever happens).
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
//               1 s, `error_kinds` every error frame senders got before the clients closed
//               (warm-up included), `errors` those inside the measured window.
//   latency     pairs, rate, size, warmup_s, duration_s
//               open loop: `rate` messages per second in all, evenly spaced, round-robin
//               over the pairs; each payload carries its send time and the receiver computes
//               the one-way latency (sender and receiver share this process's clock).
//   idle        count, concurrency, hold_s
//               opens `count` connections (`concurrency` handshakes at a time), prints a
//               `held` line, then holds them until a `release` line on stdin or hold_s, and
//               reports how many the server kept open.
//   connrate    concurrency, warmup_s, duration_s
//               `concurrency` workers each open a connection, wait for its id, start the
//               closing handshake and open the next; reports ids received per second.
//
// Output, JSON lines on stdout: {"event":"measure.start"} and {"event":"measure.end"} as the
// measured window opens and closes (run.py samples the server's CPU time there), {"event":
// "held",...} in idle mode, and last {"event":"result",...}. Every result carries gen_cpu,
// this process's CPU time over the measured window as a fraction of one core
// (process.cpuUsage), to show whether the generator could be the bottleneck.
//
// Client frames are masked with the all-zero key (RFC 6455 requires the mask bit; any key is
// valid), so masking costs nothing. Pings are answered; server frames are parsed in place.

import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

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

// Open `n` clients, `concurrency` handshakes at a time; returns [clients, failures].
async function openMany(n, concurrency, handlers, { tolerate = false } = {}) {
  const clients = [];
  const failures = {};
  let next = 0;
  async function worker() {
    while (next < n) {
      const index = next++;
      const client = new Client(handlers(index));
      try {
        clients[index] = await client.connect(cfg.host, cfg.port);
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
class Window {
  start() {
    this.t0 = performance.now();
    this.cpu0 = process.cpuUsage();
    emit({ event: 'measure.start' });
  }

  stop() {
    this.t1 = performance.now();
    const cpu = process.cpuUsage(this.cpu0);
    emit({ event: 'measure.end' });
    this.wall_s = (this.t1 - this.t0) / 1000;
    this.gen_cpu = (cpu.user + cpu.system) / 1e6 / this.wall_s;
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
  const [receivers] = await openMany(nReceivers, 64, (i) => ({
    onMessage() {
      received++;
      routes[i].credit++;
    },
    onData() {
      flush(routes[i]);
    },
  }));
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
  await sleep(cfg.duration_s);
  w.stop();
  const count = received - before[0];
  const windowErrors = errors - before[1];
  stopped = true;
  // No more sends: once every message in flight has arrived (or been answered with an error
  // frame) each route's credit is back to the full window. What is missing 1 s later is lost.
  const settle = performance.now() + 1000;
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

// Latency runs in two processes, both on the generator's core: this one holds the receivers
// and measures; a child (mode latency-sender) holds the senders and paces them. The sender
// sleeps between sends in Atomics.wait, which wakes to within tens of microseconds, so sends
// are evenly spaced without a busy loop, while the receivers here stay purely event-driven
// and see each message as soon as it arrives. Stamps are process.hrtime (CLOCK_MONOTONIC, one
// clock for both processes) in ns since `epoch`, written as the first digits of the payload.
async function latency() {
  const epoch = process.hrtime.bigint();
  const nowNs = () => Number(process.hrtime.bigint() - epoch);
  const stamps = [];
  const latencies = [];
  const [receivers] = await openMany(cfg.pairs, 64, () => ({
    onMessage(_client, buf, start, end) {
      let stamp = 0;
      for (let i = start; i < end; i++) {
        const d = buf[i] - 48;
        if (d < 0 || d > 9) break;
        stamp = stamp * 10 + d;
      }
      latencies.push(nowNs() - stamp);
      stamps.push(stamp);
    },
  }));
  const child = spawn(
    process.execPath,
    [
      fileURLToPath(import.meta.url),
      JSON.stringify({
        ...cfg,
        mode: 'latency-sender',
        to: receivers.map((r) => r.id),
        epoch: epoch.toString(),
      }),
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const w = new Window();
  let sender = null;
  for await (const line of createInterface({ input: child.stdout })) {
    const event = JSON.parse(line);
    if (event.event === 'measure.start') w.start();
    else if (event.event === 'measure.end') w.stop();
    else if (event.event === 'result') sender = event;
    else if (event.event === 'error') fail(`sender: ${event.detail}`);
  }
  if (sender === null) fail('the sender process ended without a result');
  const span = [sender.from_ns, sender.to_ns];
  const inWindow = () => stamps.filter((s) => s >= span[0] && s < span[1]).length;
  // Messages still in flight get 1 s to arrive before they count as lost.
  const deadline = performance.now() + 1000;
  while (inWindow() < sender.sent && performance.now() < deadline) await sleep(0.01);
  await closeAll(receivers);
  const measured = latencies.filter((_, i) => stamps[i] >= span[0] && stamps[i] < span[1]);
  measured.sort((a, b) => a - b);
  const us = (ns) => (ns === null ? null : ns / 1000);
  return {
    target_rate: cfg.rate,
    achieved_rate: sender.sent / sender.wall_s,
    sent: sender.sent,
    received: measured.length,
    lost: sender.sent - measured.length,
    errors: sender.errors,
    p50_us: us(percentile(measured, 0.5)),
    p99_us: us(percentile(measured, 0.99)),
    p999_us: us(percentile(measured, 0.999)),
    max_us: us(measured.length ? measured[measured.length - 1] : null),
    send_lag_p99_us: sender.lag_p99_us,
    wall_s: w.wall_s,
    gen_cpu: w.gen_cpu + sender.cpu_s / w.wall_s,
  };
}

async function latencySender() {
  const epoch = BigInt(cfg.epoch);
  const nowNs = () => Number(process.hrtime.bigint() - epoch);
  let errors = 0;
  const [senders] = await openMany(cfg.to.length, 64, () => ({
    onMessage() {
      errors++;
    },
  }));
  const prefixes = cfg.to.map((id) => `{"to":${JSON.stringify(id)},"message":"`);
  const pad = 'x'.repeat(cfg.size);
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const intervalNs = 1e9 / cfg.rate;
  const begin = nowNs();
  const from = begin + cfg.warmup_s * 1e9;
  const to = from + cfg.duration_s * 1e9;
  const lags = [];
  let sent = 0;
  let cpu0 = null;
  let due = begin;
  let pair = 0;
  let lastTurn = begin;
  for (;;) {
    let now = nowNs();
    if (cpu0 === null && now >= from) {
      cpu0 = process.cpuUsage();
      emit({ event: 'measure.start' });
    }
    if (now >= to) break;
    while (due <= now && due < to) {
      const stamp = String(now);
      const body = stamp + pad.slice(stamp.length);
      senders[pair].write(encodeFrame(prefixes[pair] + body + '"}'));
      if (now >= from) {
        sent++;
        lags.push(now - due);
      }
      pair = (pair + 1) % senders.length;
      due += intervalNs;
      now = nowNs();
    }
    if (now - lastTurn > 20e6) {
      // Let the event loop run now and then: write callbacks, pings, error frames.
      await new Promise((resolve) => setImmediate(resolve));
      lastTurn = nowNs();
      continue;
    }
    const gap = due - nowNs();
    if (gap > 0) Atomics.wait(sleeper, 0, 0, Math.min(gap, 20e6) / 1e6);
  }
  const cpu = process.cpuUsage(cpu0 ?? undefined);
  emit({ event: 'measure.end' });
  await closeAll(senders);
  lags.sort((a, b) => a - b);
  const lag = percentile(lags, 0.99);
  return {
    sent,
    errors,
    from_ns: from,
    to_ns: to,
    wall_s: cfg.duration_s,
    cpu_s: (cpu.user + cpu.system) / 1e6,
    lag_p99_us: lag === null ? null : lag / 1000,
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

async function connrate() {
  let opened = 0;
  let failed = 0;
  const failures = {};
  const handshakes = [];
  const closing = new Set();
  let running = true;
  let measuring = false;
  async function worker() {
    while (running) {
      const client = new Client({ onClose: (c) => closing.delete(c) });
      const t = performance.now();
      try {
        await client.connect(cfg.host, cfg.port);
      } catch (err) {
        failed++;
        failures[err.message] = (failures[err.message] ?? 0) + 1;
        await sleep(0.001);
        continue;
      }
      if (measuring) {
        opened++;
        handshakes.push((performance.now() - t) * 1000);
      }
      closing.add(client);
      client.close();
    }
  }
  const workers = Array.from({ length: cfg.concurrency }, worker);
  await sleep(cfg.warmup_s);
  const w = new Window();
  measuring = true;
  w.start();
  await sleep(cfg.duration_s);
  w.stop();
  measuring = false;
  running = false;
  await Promise.all(workers);
  await closeAll([...closing]);
  handshakes.sort((a, b) => a - b);
  return {
    opens_per_s: opened / w.wall_s,
    opened,
    failed,
    failures,
    handshake_p50_us: percentile(handshakes, 0.5),
    handshake_p99_us: percentile(handshakes, 0.99),
    wall_s: w.wall_s,
    gen_cpu: w.gen_cpu,
  };
}

const modes = {
  throughput: () =>
    closedLoop({ receivers: cfg.pairs, feeders: 1, window: cfg.window, size: cfg.size }),
  fanin: () =>
    closedLoop({ receivers: 1, feeders: cfg.senders, window: cfg.window, size: cfg.size }),
  latency,
  'latency-sender': latencySender,
  idle,
  connrate,
};

if (!(cfg.mode in modes)) fail(`unknown mode ${JSON.stringify(cfg.mode)}`);
const result = await modes[cfg.mode]();
emit({ event: 'result', mode: cfg.mode, ...result });
process.exit(0);
