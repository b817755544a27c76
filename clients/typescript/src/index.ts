/**
 * TypeScript client for keyward, the envelope-encryption key service, on
 * `@grpc/grpc-js` with types generated from `proto/` by ts-proto.
 *
 * ```ts
 * const kw = new KeywardClient("127.0.0.1:50051", { token: process.env.KEYWARD_TOKEN });
 * const row = { connection_id: "42" };             // bind the ciphertext to its row
 * const sealed = await kw.encrypt(Buffer.from("hunter2"), row);
 * const opened = await kw.decrypt(sealed.blob, row);
 * for await (const event of kw.watchRotation(jobId)) console.log(event.job?.processedRows);
 * ```
 *
 * Failures reject with a {@link KeywardError} carrying the gRPC code; batch
 * calls resolve to one result per item, a value or a `KeywardError`.
 */

import {
  credentials as grpcCredentials,
  type CallOptions,
  type ChannelCredentials,
  Metadata,
  type ServiceError,
  status as Status,
} from "@grpc/grpc-js";

import {
  AdminClient,
  type CreateKeyRequest,
  type Key,
  type RotationJob,
  type RotationProgress,
  type StartRotationRequest,
} from "./gen/keyward/v1/admin.js";
import {
  CryptoClient,
  type DecryptRequest,
  type DecryptResponse,
  type EncryptResponse,
  Envelope,
  EnvelopeForm,
  type ItemError,
} from "./gen/keyward/v1/crypto.js";

export { Envelope, Status };
export type { RotationJob, RotationProgress };
export { RotationStatus } from "./gen/keyward/v1/admin.js";

/** An encryption context: the pairs a ciphertext is bound to. */
export type Context = Record<string, string>;

/** A ciphertext to decrypt: the one-column blob, or the envelope. */
export type Ciphertext = Uint8Array | Envelope;

/** A call keyward refused or could not serve. */
export class KeywardError extends Error {
  constructor(
    /** The gRPC status code (`Status.INVALID_ARGUMENT`, …). */
    readonly code: Status,
    readonly details: string,
  ) {
    super(`${Status[code] ?? code}: ${details}`);
    this.name = "KeywardError";
  }

  static from(error: ServiceError | ItemError): KeywardError {
    if ("details" in error) return new KeywardError(error.code, error.details);
    return new KeywardError(error.code as Status, error.message);
  }
}

/** An Encrypt's result: store `blob` (one column) or `envelope`. */
export interface Sealed {
  blob: Buffer;
  envelope: Envelope;
  /** The `key_id` of the key it is under. */
  keyId: string;
}

/** A Decrypt's result. */
export interface Opened {
  plaintext: Buffer;
  /** `encryption_keys.id` of the key it was under (empty for legacy). */
  encryptionKeyId: string;
  legacy: boolean;
}

export interface ClientOptions {
  /** A bearer token from `keyward token create`. */
  token?: string;
  /** PEM CA for TLS; without it the channel is plaintext. */
  rootCerts?: Buffer;
  /** Client certificate and key (PEM) for mutual TLS. */
  certChain?: Buffer;
  privateKey?: Buffer;
  /** Deadline of each unary call, in milliseconds. */
  deadlineMs?: number;
}

export class KeywardClient {
  private readonly crypto: CryptoClient;
  private readonly admin: AdminClient;
  private readonly metadata: Metadata;
  private readonly deadlineMs?: number;

  constructor(target: string, options: ClientOptions = {}) {
    const creds: ChannelCredentials = options.rootCerts
      ? grpcCredentials.createSsl(options.rootCerts, options.privateKey, options.certChain)
      : grpcCredentials.createInsecure();
    this.crypto = new CryptoClient(target, creds);
    this.admin = new AdminClient(target, creds);
    this.metadata = new Metadata();
    if (options.token !== undefined) {
      this.metadata.set("authorization", `Bearer ${options.token}`);
    }
    this.deadlineMs = options.deadlineMs;
  }

  /** Closes both stubs' channels. */
  close(): void {
    this.crypto.close();
    this.admin.close();
  }

  private options(): Partial<CallOptions> {
    return this.deadlineMs === undefined ? {} : { deadline: Date.now() + this.deadlineMs };
  }

  private unary<Req, Res>(
    call: (
      req: Req,
      md: Metadata,
      opts: Partial<CallOptions>,
      cb: (err: ServiceError | null, res: Res) => void,
    ) => unknown,
    request: Req,
  ): Promise<Res> {
    return new Promise((resolve, reject) => {
      call(request, this.metadata, this.options(), (err, res) =>
        err ? reject(KeywardError.from(err)) : resolve(res),
      );
    });
  }

  /** Encrypts `plaintext` bound to `context`. */
  async encrypt(plaintext: Uint8Array, context: Context): Promise<Sealed> {
    const res = await this.unary(this.crypto.encrypt.bind(this.crypto), {
      plaintext: Buffer.from(plaintext),
      context,
      form: EnvelopeForm.ENVELOPE_FORM_BOTH,
    });
    return sealed(res);
  }

  /** Decrypts a blob or an envelope with the context it was encrypted with. */
  async decrypt(ciphertext: Ciphertext, context: Context): Promise<Opened> {
    const res = await this.unary(
      this.crypto.decrypt.bind(this.crypto),
      decryptRequest(ciphertext, context),
    );
    return opened(res);
  }

  /** Encrypts many items in one call; one result per item, in order. */
  async batchEncrypt(
    items: Array<{ plaintext: Uint8Array; context: Context }>,
  ): Promise<Array<Sealed | KeywardError>> {
    const res = await this.unary(this.crypto.batchEncrypt.bind(this.crypto), {
      items: items.map(({ plaintext, context }) => ({
        plaintext: Buffer.from(plaintext),
        context,
        form: EnvelopeForm.ENVELOPE_FORM_BOTH,
      })),
    });
    return res.results.map((r) => (r.ok ? sealed(r.ok) : itemError(r.error)));
  }

  /** Decrypts many items in one call; one result per item, in order. */
  async batchDecrypt(
    items: Array<{ ciphertext: Ciphertext; context: Context }>,
  ): Promise<Array<Opened | KeywardError>> {
    const res = await this.unary(this.crypto.batchDecrypt.bind(this.crypto), {
      items: items.map(({ ciphertext, context }) => decryptRequest(ciphertext, context)),
    });
    return res.results.map((r) => (r.ok ? opened(r.ok) : itemError(r.error)));
  }

  /** Registers a key record (admin role). */
  createKey(request: Partial<CreateKeyRequest> & { keyId: string }): Promise<Key> {
    return this.unary(this.admin.createKey.bind(this.admin), {
      kmsKeyArn: "",
      alias: "",
      provider: "",
      activate: false,
      ...request,
    });
  }

  /** Queues a rotation job (admin role). */
  startRotation(request: Partial<StartRotationRequest> = {}): Promise<RotationJob> {
    return this.unary(this.admin.startRotation.bind(this.admin), {
      targetKeyId: "",
      mode: 0,
      dryRun: false,
      batchSize: 0,
      maxRowsPerSecond: 0,
      targetBatchMs: 0,
      maxForegroundP99Ms: 0,
      minRowsPerSecond: 0,
      maxReplicationLagMs: 0,
      ...request,
    });
  }

  /** One job as it stands. */
  rotationJob(jobId: string): Promise<RotationJob> {
    return this.unary(this.admin.getRotationJob.bind(this.admin), { jobId });
  }

  /**
   * The job's progress: its state at once, then an event per change (or
   * every second); ends after the terminal event.
   */
  async *watchRotation(jobId: string): AsyncGenerator<RotationProgress> {
    const stream = this.admin.watchRotation({ jobId }, this.metadata);
    try {
      for await (const event of stream) yield event as RotationProgress;
    } catch (err) {
      throw KeywardError.from(err as ServiceError);
    }
  }
}

function sealed(res: EncryptResponse): Sealed {
  return { blob: res.blob, envelope: res.envelope ?? Envelope.fromPartial({}), keyId: res.keyId };
}

function opened(res: DecryptResponse): Opened {
  return { plaintext: res.plaintext, encryptionKeyId: res.encryptionKeyId, legacy: res.legacy };
}

function itemError(error: ItemError | undefined): KeywardError {
  return error ? KeywardError.from(error) : new KeywardError(Status.INTERNAL, "empty batch result");
}

function decryptRequest(ciphertext: Ciphertext, context: Context): DecryptRequest {
  return ciphertext instanceof Uint8Array
    ? { context, blob: Buffer.from(ciphertext) }
    : { context, envelope: ciphertext };
}
