// Run the seed post's browser client (seed_page.html) in two headless Chromium pages and let
// them message each other through relayd.
//
// Usage: node browser_seed.mjs http://127.0.0.1:HTTPPORT/
//
// The page's own code (the post's) logs every frame with
//   console.log('message from server', e.data)
// so each page's frames are read from its console; the first one is the page's id. The
// post's send() snippets are run as they are, with the post's placeholder recipient
// "sec-websocket-identifier" replaced by the other page's id. Prints ONE JSON object with
// what each page received; test_browser_seed.py makes the assertions.
// Uses Debian's /usr/bin/chromium and never downloads a browser.

import { chromium } from 'playwright-core';

const pageUrl = process.argv[2];
const STEP_TIMEOUT_MS = 10000;
const DEADLINE_MS = 60000;
setTimeout(() => {
  console.error(`browser_seed.mjs: deadline of ${DEADLINE_MS} ms passed`);
  process.exit(2);
}, DEADLINE_MS).unref();

const PREFIX = 'message from server ';
const PLACEHOLDER = '"sec-websocket-identifier"';

// One page in its own browser context (two separate users), with a FIFO of the frames its
// console reports, plus anything it logs as an error.
async function openPage(browser, name) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  const frames = [];
  const all = [];
  const waiters = [];
  const errors = [];
  page.on('console', (msg) => {
    const text = msg.text();
    if (msg.type() === 'log' && text.startsWith(PREFIX)) {
      const frame = text.slice(PREFIX.length);
      all.push(frame);
      const waiter = waiters.shift();
      if (waiter) waiter(frame);
      else frames.push(frame);
    } else if (msg.type() === 'error') {
      errors.push(text);
    }
  });
  page.on('pageerror', (err) => errors.push(`pageerror: ${err.message}`));
  await page.goto(pageUrl);
  return {
    page,
    all,
    errors,
    // The next frame this page logged, or an error naming the step that waited in vain.
    next(step) {
      if (frames.length > 0) return Promise.resolve(frames.shift());
      return new Promise((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`page ${name}: no frame within ${STEP_TIMEOUT_MS} ms (${step})`)),
          STEP_TIMEOUT_MS,
        );
        waiters.push((frame) => {
          clearTimeout(timer);
          resolve(frame);
        });
      });
    },
    // Run one of the post's send() snippets from the page, as a classic script.
    async run(snippetId, recipient) {
      let code = await page.textContent(`#${snippetId}`);
      if (recipient !== undefined) {
        if (code.split(PLACEHOLDER).length !== 2) {
          throw new Error(`#${snippetId} must hold the placeholder exactly once`);
        }
        code = code.replace(PLACEHOLDER, JSON.stringify(recipient));
      }
      await page.addScriptTag({ content: code });
    },
  };
}

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
const result = { browser: browser.version() };
try {
  const a = await openPage(browser, 'A');
  const b = await openPage(browser, 'B');
  result.idA = await a.next('id of A');
  result.idB = await b.next('id of B');

  // The post's chat: A sends its JSON to B, then B to A.
  await a.run('seed-send-data', result.idB);
  result.bGot = await b.next('B receives from A');
  await b.run('seed-send-data', result.idA);
  result.aGot = await a.next('A receives from B');

  // The post's first send, a non-JSON string, which crashed the post's own server.
  await a.run('seed-send-hello');
  result.aHelloReply = await a.next('A gets an answer to its non-JSON frame');

  // Both pages are still connected and A can still reach B.
  result.readyStates = [
    await a.page.evaluate('connection.readyState'),
    await b.page.evaluate('connection.readyState'),
  ];
  await a.run('seed-send-data', result.idB);
  result.bGotAgain = await b.next('B receives from A after the error');

  result.aAll = a.all;
  result.bAll = b.all;
  result.errors = [...a.errors, ...b.errors];
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(result) + '\n');
