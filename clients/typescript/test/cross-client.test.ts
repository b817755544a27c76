/**
 * The same ciphertext through every client: each of Rust (keyward-client's
 * `kwcli` example), TypeScript, Python (keyward_client) and grpcurl
 * encrypts a plaintext, and each of the others decrypts it.
 *
 * Needs the other clients built: $KEYWARD_RUST_CLI (default
 * target/debug/examples/kwcli), $KEYWARD_PYTHON (default .tools/venv's,
 * with clients/python/src importable) and grpcurl (default .tools/venv).
 * scripts/test provides them; without them this test is skipped, and it
 * fails instead when CI=true.
 */

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { KeywardClient } from "../src/index.js";
import { keywardBinary, REPO, type Server, startServer } from "./server.js";

const rustCli = process.env.KEYWARD_RUST_CLI ?? join(REPO, "target/debug/examples/kwcli");
const python = process.env.KEYWARD_PYTHON ?? join(REPO, ".tools/venv/bin/python");
const grpcurl = process.env.KEYWARD_GRPCURL ?? join(REPO, ".tools/venv/bin/grpcurl");

function missing(): string | undefined {
  for (const [what, path] of [["kwcli", rustCli], ["python", python], ["grpcurl", grpcurl]]) {
    if (!existsSync(path)) return `${what} not at ${path}`;
  }
  return undefined;
}

const binary = keywardBinary();
const absent = missing();
if (absent && process.env.CI === "true") throw new Error(`cross-client test: ${absent}`);
if (absent) console.log(`SKIPPED (${absent})`);

/** One client's encrypt (to a base64 blob) and decrypt (from one). */
interface Side {
  name: string;
  encrypt(plaintext: string, connectionId: string): Promise<string>;
  decrypt(blob: string, connectionId: string): Promise<string>;
}

const PYTHON_SCRIPT = `
import base64, os, sys
from keyward_client import Client
op, target, connection_id = sys.argv[1:4]
with Client(target, token=os.environ["KEYWARD_TOKEN"]) as kw:
    ctx = {"connection_id": connection_id}
    data = sys.stdin.buffer.read()
    if op == "encrypt":
        print(base64.b64encode(kw.encrypt(data, ctx).blob).decode())
    else:
        sys.stdout.buffer.write(kw.decrypt(base64.b64decode(data), ctx).plaintext)
`;

function sides(server: Server, ts: KeywardClient): Side[] {
  const env = { ...process.env, KEYWARD_TOKEN: server.appToken };
  const run = (cmd: string, args: string[], input: string, extra: object = {}) =>
    execFileSync(cmd, args, { input, encoding: "utf8", env: { ...env, ...extra } }).trim();
  const grpc = (method: string, body: object) =>
    JSON.parse(
      run(grpcurl, ["-plaintext", "-H", `authorization: Bearer ${server.appToken}`, "-d", "@",
        server.target, `keyward.v1.Crypto/${method}`], JSON.stringify(body)),
    );
  return [
    {
      name: "rust",
      encrypt: async (p, id) => run(rustCli, ["encrypt", server.target, `connection_id=${id}`], p),
      decrypt: async (b, id) => run(rustCli, ["decrypt", server.target, `connection_id=${id}`], b),
    },
    {
      name: "typescript",
      encrypt: async (p, id) =>
        (await ts.encrypt(Buffer.from(p), { connection_id: id })).blob.toString("base64"),
      decrypt: async (b, id) =>
        (await ts.decrypt(Buffer.from(b, "base64"), { connection_id: id })).plaintext.toString(),
    },
    {
      name: "python",
      encrypt: async (p, id) =>
        run(python, ["-c", PYTHON_SCRIPT, "encrypt", server.target, id], p, {
          PYTHONPATH: join(REPO, "clients/python/src"),
        }),
      decrypt: async (b, id) =>
        run(python, ["-c", PYTHON_SCRIPT, "decrypt", server.target, id], b, {
          PYTHONPATH: join(REPO, "clients/python/src"),
        }),
    },
    {
      name: "grpcurl",
      encrypt: async (p, id) =>
        grpc("Encrypt", { plaintext: Buffer.from(p).toString("base64"), context: { connection_id: id } }).blob,
      decrypt: async (b, id) =>
        Buffer.from(grpc("Decrypt", { blob: b, context: { connection_id: id } }).plaintext, "base64").toString(),
    },
  ];
}

describe("every client decrypts what every other encrypted", { skip: !binary || !!absent }, () => {
  let server: Server;
  before(async () => {
    server = await startServer(binary!);
  });
  after(async () => {
    await server?.stop();
  });

  it("rust, typescript, python and grpcurl agree", async () => {
    const ts = new KeywardClient(server.target, { token: server.appToken });
    const clients = sides(server, ts);
    let checked = 0;
    for (const from of clients) {
      const plaintext = `credentials sealed by ${from.name}`;
      const connectionId = `cross-${from.name}`;
      const blob = await from.encrypt(plaintext, connectionId);
      for (const to of clients.filter((c) => c !== from)) {
        assert.equal(await to.decrypt(blob, connectionId), plaintext, `${from.name} → ${to.name}`);
        checked++;
      }
    }
    assert.equal(checked, 12);
    ts.close();
  });
});
