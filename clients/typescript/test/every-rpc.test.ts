/**
 * Every RPC of the proto has a client method named after it: the services
 * come from the generated service definitions, each method is looked up by
 * name, then each is called against a real server (with no rotation worker,
 * so a job stays pending until the test moves it) through an interceptor
 * that records which RPCs went out.
 */

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { type Interceptor, InterceptingCall } from "@grpc/grpc-js";

import { AdminService } from "../src/gen/keyward/v1/admin.js";
import { CryptoService } from "../src/gen/keyward/v1/crypto.js";
import { KeywardClient, KeywardError, RotationStatus, Status } from "../src/index.js";
import { keywardBinary, type Server, startServer } from "./server.js";

/** `path` → helper name (the definition's key) of every RPC. */
const RPCS = new Map<string, string>(
  [AdminService, CryptoService].flatMap((service) =>
    Object.entries(service).map(([name, rpc]) => [rpc.path, name] as [string, string]),
  ),
);

describe("a KeywardClient method for every RPC", () => {
  it("has a method of each RPC's name", () => {
    assert.ok(RPCS.size > 20, `${RPCS.size} RPCs`);
    const methods = KeywardClient.prototype as unknown as Record<string, unknown>;
    const missing = [...RPCS.values()].filter((name) => typeof methods[name] !== "function");
    assert.deepEqual(missing, []);
  });

  const binary = keywardBinary();
  describe("against keyward serve --no-worker", { skip: !binary }, () => {
    let server: Server;
    before(async () => {
      server = await startServer(binary!, ["--no-worker"]);
    });
    after(async () => {
      await server?.stop();
    });

    it("reaches every RPC", async () => {
      const sent = new Set<string>();
      const record: Interceptor = (options, nextCall) => {
        sent.add(options.method_definition.path);
        return new InterceptingCall(nextCall(options));
      };
      const kw = new KeywardClient(server.target, { token: server.adminToken, interceptors: [record] });
      try {
        const row = { connection_id: "1" };
        const sealed = await kw.encrypt(Buffer.from("s3cret"), row);
        assert.equal((await kw.decrypt(sealed.blob, row)).plaintext.toString(), "s3cret");
        assert.equal(((await kw.batchEncrypt([{ plaintext: Buffer.from("x"), context: row }]))[0] as { keyId: string }).keyId, "primary");
        assert.ok(!((await kw.batchDecrypt([{ ciphertext: sealed.envelope, context: row }]))[0] instanceof KeywardError));
        // Already on the active key: returned as given.
        assert.equal((await kw.rewrap(sealed.blob, row)).rewrapped, false);
        const [wrong] = await kw.batchRewrap([{ ciphertext: sealed.blob, context: { connection_id: "2" } }]);
        assert.ok(wrong instanceof KeywardError && wrong.code === Status.INVALID_ARGUMENT);

        assert.equal((await kw.listRotationTargets())[0].table, "connections");
        const added = await kw.addRotationTarget({ table: "connections", encoding: "bytes" });
        assert.deepEqual(added.map((t) => t.table), ["connections"]);
        await assert.rejects(kw.removeRotationTarget("no_such_table"), (err: KeywardError) => err.code === Status.NOT_FOUND);

        assert.equal((await kw.createKey({ keyId: "next" })).keyId, "next");
        assert.equal((await kw.activateKey("next")).previous?.keyId, "primary");
        assert.deepEqual((await kw.listKeys()).map((k) => k.keyId), ["next", "primary"]);
        assert.equal((await kw.retireKey("primary", { dryRun: true })).key?.keyId, "primary");
        assert.ok((await kw.listReplicas()).length > 0);
        await kw.getKeyUsage();
        assert.equal((await kw.refreshKeyMetadata()).keyCount, 2);
        assert.ok((await kw.selfTest()).keys.every((k) => k.ok));
        assert.equal(await kw.pruneExpiredScopedTokens(), 0);

        const job = await kw.startRotation();
        for await (const first of kw.watchRotation(job.id)) {
          assert.equal(first.job?.id, job.id);
          break;
        }
        assert.equal((await kw.pauseRotation(job.id)).status, RotationStatus.ROTATION_STATUS_PAUSED);
        await kw.resumeRotation(job.id);
        assert.equal((await kw.updateRotation(job.id, { batchSize: 10 })).batchSize, 10);
        assert.equal((await kw.cancelRotation(job.id)).status, RotationStatus.ROTATION_STATUS_CANCELLED);
        await kw.requeueRotation(job.id);
        assert.equal((await kw.getRotationJob(job.id)).id, job.id);
        assert.deepEqual((await kw.listRotationJobs()).map((j) => j.id), [job.id]);
      } finally {
        kw.close();
      }
      const missing = [...RPCS.keys()].filter((path) => !sent.has(path));
      assert.deepEqual(missing, [], "no client method reached these RPCs");
    });
  });
});
