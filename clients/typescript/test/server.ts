/**
 * A real keyward server for the tests: `keyward serve` (the binary cargo
 * built, or $KEYWARD_BIN) on a fresh SQLite database with bearer tokens
 * from `keyward token create`.
 */

import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { KeywardClient } from "../src/index.js";

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, "../../../..");
const MASTER = "typescript-client-test-master-secret-0123456789";

export interface Server {
  target: string;
  adminToken: string;
  appToken: string;
  /** Runs a `keyward` operator command on the server's database. */
  keyward(args: string[], input?: string): string;
  stop(): Promise<void>;
}

/** The keyward binary, or why there is none (fatal when CI=true). */
export function keywardBinary(): string | undefined {
  const path = process.env.KEYWARD_BIN ?? join(REPO, "target", "debug", "keyward");
  if (existsSync(path)) return path;
  const why = `no keyward binary at ${path} (run cargo build, or set KEYWARD_BIN)`;
  if (process.env.CI === "true") throw new Error(why);
  console.log(`SKIPPED (${why})`);
  return undefined;
}

function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const address = s.address();
      s.close(() => (typeof address === "object" && address ? ok(address.port) : fail()));
    });
  });
}

/** `keyward serve` with `serveArgs` (e.g. `--no-worker`) on a fresh database. */
export async function startServer(binary: string, serveArgs: string[] = []): Promise<Server> {
  const dir = mkdtempSync(join(tmpdir(), "keyward-ts-"));
  const env = {
    PATH: process.env.PATH ?? "",
    DATABASE_URL: `sqlite://${join(dir, "keyward.db")}`,
    ENCRYPTION_MASTER_KEY: MASTER,
    RUST_LOG: "warn",
  };
  const keyward = (args: string[], input?: string) =>
    execFileSync(binary, args, { env, input, encoding: "utf8" }).trim();
  keyward(["seed-key"]);
  const adminToken = keyward([
    "token", "create", "--name", "ts-admin", "--role", "admin", "--role", "encrypt", "--role", "decrypt", "--role", "rewrap",
  ]);
  const appToken = keyward(["token", "create", "--name", "ts-app", "--role", "encrypt", "--role", "decrypt"]);
  const target = `127.0.0.1:${await freePort()}`;
  const child: ChildProcess = spawn(binary, ["serve", "--listen", target, "--audit-log", "off", ...serveArgs], {
    env,
    stdio: ["ignore", "ignore", "inherit"],
  });
  const probe = new KeywardClient(target, { token: adminToken });
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      await probe.encrypt(Buffer.from("ready?"), {});
      break;
    } catch (err) {
      if (Date.now() > deadline || child.exitCode !== null) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  probe.close();
  return {
    target,
    adminToken,
    appToken,
    keyward,
    stop: () =>
      new Promise((done) => {
        child.once("exit", () => done());
        child.kill("SIGTERM");
      }),
  };
}
