import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { ConnectionService } from "../examples/connection-service.js";
import { KeywardClient, KeywardError, RotationStatus, Status } from "../src/index.js";
import { keywardBinary, type Server, startServer } from "./server.js";

const binary = keywardBinary();

describe("KeywardClient against keyward serve", { skip: !binary }, () => {
  let server: Server;
  before(async () => {
    server = await startServer(binary!);
  });
  after(async () => {
    await server?.stop();
  });

  it("round-trips bound to the context, in both forms", async () => {
    const kw = new KeywardClient(server.target, { token: server.appToken });
    const row = { connection_id: "42" };
    const sealed = await kw.encrypt(Buffer.from("hunter2"), row);
    assert.equal(sealed.keyId, "primary");
    assert.equal((await kw.decrypt(sealed.blob, row)).plaintext.toString(), "hunter2");
    const opened = await kw.decrypt(sealed.envelope, row);
    assert.equal(opened.plaintext.toString(), "hunter2");
    assert.equal(opened.legacy, false);
    await assert.rejects(kw.decrypt(sealed.blob, { connection_id: "43" }), (err: KeywardError) => {
      assert.equal(err.code, Status.INVALID_ARGUMENT);
      return true;
    });
    kw.close();
  });

  it("rejects with typed errors for who may call", async () => {
    const anonymous = new KeywardClient(server.target);
    await assert.rejects(anonymous.encrypt(Buffer.from("x"), {}), { code: Status.UNAUTHENTICATED });
    const app = new KeywardClient(server.target, { token: server.appToken });
    await assert.rejects(app.startRotation(), { code: Status.PERMISSION_DENIED });
    anonymous.close();
    app.close();
  });

  it("reports each batch item on its own", async () => {
    const kw = new KeywardClient(server.target, { token: server.appToken });
    const sealed = await kw.batchEncrypt(
      [0, 1, 2].map((i) => ({ plaintext: Buffer.from(`secret ${i}`), context: { n: `${i}` } })),
    );
    const items = sealed.map((s, i) => {
      assert.ok(!(s instanceof KeywardError));
      return { ciphertext: s.blob, context: { n: i === 1 ? "99" : `${i}` } };
    });
    const opened = await kw.batchDecrypt(items);
    assert.ok(!(opened[0] instanceof KeywardError) && opened[0].plaintext.toString() === "secret 0");
    assert.ok(opened[1] instanceof KeywardError && opened[1].code === Status.INVALID_ARGUMENT);
    assert.ok(!(opened[2] instanceof KeywardError) && opened[2].plaintext.toString() === "secret 2");
    kw.close();
  });

  it("watches a rotation to its end with for await", async () => {
    // Legacy rows (written the pre-keyward way) for the rotation to move.
    for (let i = 0; i < 8; i++) {
      server.keyward(["legacy-encrypt", "--connection-id", `ts-conn-${i}`], `credential ${i}`);
    }
    const kw = new KeywardClient(server.target, { token: server.adminToken });
    await kw.createKey({ keyId: "ts-next", activate: true });
    const job = await kw.startRotation({ batchSize: 3 });
    const events = [];
    for await (const event of kw.watchRotation(job.id)) events.push(event);
    const last = events.at(-1)!;
    assert.ok(last.terminal);
    assert.equal(last.job?.status, RotationStatus.ROTATION_STATUS_COMPLETED);
    assert.ok((last.job?.succeededRows ?? 0) >= 8);
    assert.equal(last.job?.failedRows, 0);
    await assert.rejects(
      (async () => {
        for await (const _ of kw.watchRotation("no-such-job"));
      })(),
      { code: Status.NOT_FOUND },
    );
    kw.close();
  });

  it("runs the connection-service example: encrypt before writing, decrypt on read", async () => {
    const kw = new KeywardClient(server.target, { token: server.appToken });
    const table = new Map();
    const service = new ConnectionService(kw, table);
    const row = await service.create("7", "billing database", { password: "hunter2" });
    assert.equal(row.payloadCiphertext.includes(Buffer.from("hunter2")), false);
    assert.deepEqual(await service.credentials("7"), { password: "hunter2" });
    // A ciphertext copied into another row does not decrypt there.
    table.set("8", { ...row, id: "8" });
    await assert.rejects(service.credentials("8"), { code: Status.INVALID_ARGUMENT });
    kw.close();
  });
});
