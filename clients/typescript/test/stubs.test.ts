/**
 * The generated stubs are committed (src/gen), so a packed or installed
 * client needs neither proto/ nor protoc. This regenerates them from the
 * repository's proto/ (generate.sh into a scratch directory, with the
 * locked ts-proto and the pinned grpcio-tools' protoc from $PYTHON,
 * default .tools/venv's) and fails when they differ: run generate.sh and
 * commit.
 */

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { it } from "node:test";

import { REPO } from "./server.js";

const CLIENT = join(REPO, "clients", "typescript");

function files(dir: string): Map<string, string> {
  const found = new Map<string, string>();
  for (const entry of readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile()) continue;
    const path = join(entry.parentPath, entry.name);
    found.set(relative(dir, path), readFileSync(path, "utf8"));
  }
  return found;
}

it("the committed stubs are generated from proto/ as it stands", () => {
  const scratch = mkdtempSync(join(tmpdir(), "keyward-ts-gen-"));
  execFileSync("sh", ["generate.sh", scratch], {
    cwd: CLIENT,
    env: { ...process.env, PYTHON: process.env.PYTHON ?? join(REPO, ".tools", "venv", "bin", "python") },
    stdio: ["ignore", "ignore", "inherit"],
  });
  const fresh = files(scratch);
  const committed = files(join(CLIENT, "src", "gen"));
  assert.deepEqual([...committed.keys()].sort(), [...fresh.keys()].sort());
  const drifted = [...fresh].filter(([name, text]) => committed.get(name) !== text).map(([name]) => name);
  assert.deepEqual(drifted, [], "differ from proto/: run clients/typescript/generate.sh and commit");
});
