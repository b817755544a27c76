/**
 * A connection service in the style of the runbook's platform: it encrypts
 * a connection's credentials with keyward before writing the row, and
 * decrypts them on read. Each row's ciphertext is bound to the row's own
 * context `{ connection_id }`, so a ciphertext copied into another row
 * does not decrypt there.
 *
 *   keyward serve --dev &
 *   node dist/examples/connection-service.js 127.0.0.1:50051
 */

import { KeywardClient } from "../src/index.js";

/** A `connections` row as the application stores it. */
export interface ConnectionRow {
  id: string;
  name: string;
  encryptionKeyId: string;
  dataKeyCiphertext: Buffer;
  dataKeyIv: Buffer;
  payloadCiphertext: Buffer;
  payloadIv: Buffer;
}

export class ConnectionService {
  constructor(
    private readonly keyward: KeywardClient,
    /** The table; a Map here, the application's database in real life. */
    private readonly table = new Map<string, ConnectionRow>(),
  ) {}

  async create(id: string, name: string, credentials: Record<string, string>): Promise<ConnectionRow> {
    const sealed = await this.keyward.encrypt(
      Buffer.from(JSON.stringify(credentials)),
      { connection_id: id },
    );
    const row = { id, name, ...sealed.envelope };
    this.table.set(id, row);
    return row;
  }

  async credentials(id: string): Promise<Record<string, string>> {
    const row = this.table.get(id);
    if (!row) throw new Error(`no connection ${id}`);
    const { name: _name, id: _id, ...envelope } = row;
    const opened = await this.keyward.decrypt(envelope, { connection_id: id });
    return JSON.parse(opened.plaintext.toString("utf8"));
  }
}

async function main(target: string): Promise<void> {
  const keyward = new KeywardClient(target, { token: process.env.KEYWARD_TOKEN });
  const service = new ConnectionService(keyward);
  const row = await service.create("42", "billing database", { password: "hunter2" });
  console.log(`row ${row.id} stored under key record ${row.encryptionKeyId}`);
  const credentials = await service.credentials("42");
  console.log(`read back: ${credentials.password === "hunter2" ? "ok" : "WRONG"}`);
  keyward.close();
}

if (process.argv[1]?.endsWith("connection-service.js")) {
  main(process.argv[2] ?? "127.0.0.1:50051").catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
