// Drives Debian's headless Chromium with playwright-core for tests/dev/test_browser.py.
//
//   NODE_PATH=appliance/dev/server/web/node_modules node tests/dev/browser_driver.cjs USER_DATA_DIR
//
// One JSON command per line on stdin, one JSON answer per line on stdout:
//   {"cmd": "open", "url": ..., "timeout_ms": ...}  -> {"ok": true, "state": "playing"} once
//       window.viewer.state is "playing" (or {"ok": false, "error": ...})
//   {"cmd": "collect", "screenshot": PATH}           -> {"ok": true, "viewer": {...}}
//   {"cmd": "quit"}
// The page's console goes to stderr.
'use strict';

const readline = require('readline');
const { chromium } = require('playwright-core');

const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  // a test page may play audio without a click, as a kiosk screen would be set up to
  '--autoplay-policy=no-user-gesture-required',
];

async function main() {
  const userDataDir = process.argv[2];
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: false, // --headless is in FLAGS; playwright's own adds --mute-audio
    args: FLAGS,
    ignoreDefaultArgs: ['--mute-audio'],
    viewport: { width: 800, height: 700 },
  });
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (msg) => process.stderr.write(`[page ${msg.type()}] ${msg.text()}\n`));
  page.on('pageerror', (err) => process.stderr.write(`[page error] ${err}\n`));
  const reply = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const req = JSON.parse(line);
    try {
      if (req.cmd === 'open') {
        await page.goto(req.url);
        await page.waitForFunction(
          () => window.viewer && ['playing', 'failed'].includes(window.viewer.state),
          null, { timeout: req.timeout_ms || 30000, polling: 100 });
        const state = await page.evaluate(() => ({ state: viewer.state, error: viewer.error }));
        reply({ ok: state.state === 'playing', ...state });
      } else if (req.cmd === 'collect') {
        if (req.screenshot) await page.screenshot({ path: req.screenshot });
        const data = await page.evaluate(() => ({
          state: viewer.state, error: viewer.error, identity: viewer.identity,
          frames: viewer.frames, audio: viewer.audio, stats: viewer.stats,
          audioLatencyMs: viewer.audioLatencyMs,
          timeOrigin: performance.timeOrigin, now: performance.now(),
        }));
        reply({ ok: true, viewer: data });
      } else if (req.cmd === 'quit') {
        break;
      } else {
        reply({ ok: false, error: `unknown command ${req.cmd}` });
      }
    } catch (err) {
      reply({ ok: false, error: String(err) });
    }
  }
  await context.close();
}

main().catch((err) => {
  process.stderr.write(`driver failed: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
