// The dashboard end to end in headless Chromium (Debian's, driven by
// playwright-core): a real `keyward serve --dashboard-dir dist` requiring
// tokens, a throttled rotation started with the keyward CLI, the page
// following it live over gRPC-Web until it completes. Saves screenshots
// mid-rotation and at the end (to $KEYWARD_SCREENSHOTS, default
// target/dashboard/). Skipped without the keyward binary or Chromium;
// fails instead when CI=true.

import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(here, "../../..");
const binary = process.env.KEYWARD_BIN ?? join(REPO, "target/debug/keyward");
const browserPath = process.env.KEYWARD_CHROMIUM ?? "/usr/bin/chromium";
const dist = join(here, "..", "dist");
const screenshots = process.env.KEYWARD_SCREENSHOTS ?? join(REPO, "target/dashboard");
const ROWS = 90;

const missing = [binary, browserPath, join(dist, "index.html")].find((p) => !existsSync(p));
if (missing && process.env.CI === "true") throw new Error(`dashboard test: ${missing} is missing`);
if (missing) console.log(`SKIPPED (${missing} is missing)`);

function freePort() {
  return new Promise((ok) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

describe("the rotation dashboard", { skip: !!missing }, () => {
  let server;
  let browser;
  let keyward;
  let target;
  let token;

  before(async () => {
    const dir = mkdtempSync(join(tmpdir(), "keyward-dashboard-"));
    const env = {
      PATH: process.env.PATH ?? "",
      DATABASE_URL: `sqlite://${join(dir, "keyward.db")}`,
      ENCRYPTION_MASTER_KEY: "dashboard-test-master-secret-0123456789",
      RUST_LOG: "warn",
    };
    keyward = (args, input) => execFileSync(binary, args, { env, input, encoding: "utf8" }).trim();
    keyward(["seed-key"]);
    token = keyward(["token", "create", "--name", "dashboard", "--role", "admin"]);
    for (let i = 0; i < ROWS; i++) {
      keyward(["legacy-encrypt", "--connection-id", `conn-${String(i).padStart(3, "0")}`], `credential ${i}`);
    }
    keyward(["keys", "create", "--key-id", "next", "--activate"]);
    target = `127.0.0.1:${await freePort()}`;
    server = spawn(binary, ["serve", "--listen", target, "--dashboard-dir", dist, "--audit-log", "off"], {
      env,
      stdio: ["ignore", "ignore", "inherit"],
    });
    const deadline = Date.now() + 30_000;
    for (;;) {
      try {
        const res = await fetch(`http://${target}/`);
        if (res.ok) break;
      } catch {}
      if (Date.now() > deadline) throw new Error("keyward serve did not come up");
      await new Promise((r) => setTimeout(r, 100));
    }
    browser = await chromium.launch({
      executablePath: browserPath,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
  });

  after(async () => {
    await browser?.close();
    if (server) {
      const exited = new Promise((r) => server.once("exit", r));
      server.kill("SIGTERM");
      await exited;
    }
  });

  it("follows a rotation live to completion", async () => {
    const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
    const consoleErrors = [];
    page.on("pageerror", (err) => consoleErrors.push(String(err)));
    await page.goto(`http://${target}/?token=${token}`);
    // The token leaves the address bar at once.
    assert.ok(!page.url().includes(token));

    const started = keyward(["rotate", "start", "--batch-size", "5", "--max-rows-per-second", "15"]);
    const jobId = started.match(/Rotation job started: (\S+)/)[1];
    await page.locator(`[data-testid=job-row][data-job-id="${jobId}"]`).click({ timeout: 15_000 });
    await page.waitForSelector(`[data-testid=job-id]:has-text("${jobId}")`);

    const counter = (id) => page.locator(`[data-testid=${id}]`).textContent().then(Number);
    // Mid-rotation: some rows done, not all; the counters keep rising.
    await page.waitForFunction(
      (rows) => {
        const n = Number(document.querySelector("[data-testid=processed]").textContent);
        return n > 0 && n < rows;
      },
      ROWS,
      { timeout: 20_000, polling: 50 },
    );
    const early = await counter("processed");
    assert.equal(await page.locator("[data-testid=status]").textContent(), "running");
    assert.equal(await counter("total"), ROWS);
    mkdirSync(screenshots, { recursive: true });
    await page.screenshot({ path: join(screenshots, "dashboard-mid-rotation.png") });
    assert.equal(await page.locator("[data-testid=throttle]").textContent(), "no");
    // Paused by an operator: the dashboard shows the status and why the job
    // is slow; resumed, it goes on.
    keyward(["rotate", "pause", jobId]);
    await page.waitForSelector("[data-testid=status]:has-text('paused')", { timeout: 15_000 });
    assert.equal(await page.locator("[data-testid=throttle]").textContent(), "paused");
    keyward(["rotate", "resume", jobId]);
    await page.waitForSelector("[data-testid=status]:has-text('running')", { timeout: 15_000 });
    assert.equal(await page.locator("[data-testid=throttle]").textContent(), "no");
    await page.waitForFunction(() => Number(document.querySelector("[data-testid=processed]").textContent) > 0, null);
    await page.waitForFunction(
      (first) => Number(document.querySelector("[data-testid=processed]").textContent) > first,
      early,
      { timeout: 20_000, polling: 50 },
    );

    // To the end: completed, every row, none failed, a rate chart drawn.
    await page.waitForSelector("[data-testid=status]:has-text('completed')", { timeout: 30_000 });
    assert.equal(await counter("processed"), ROWS);
    assert.equal(await counter("succeeded"), ROWS);
    assert.equal(await counter("failed"), 0);
    assert.equal(await page.locator("[data-testid=progressbar]").getAttribute("aria-valuenow"), "100");
    const points = await page.locator("#chart polyline").getAttribute("points");
    assert.ok(points.split(" ").length >= 2, points);
    assert.equal(await page.locator("[data-testid=error]").isHidden(), true);
    await page.screenshot({ path: join(screenshots, "dashboard-completed.png") });
    assert.deepEqual(consoleErrors, []);
  });

  it("asks for a token when it has none", async () => {
    const page = await browser.newPage();
    await page.goto(`http://${target}/`);
    await page.waitForSelector("[data-testid=error]:has-text('enter an admin token')", { timeout: 10_000 });
  });
});
