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
 * Every RPC of both services has a method named after it in camel case
 * (`PauseRotation` is `pauseRotation`); `test/every-rpc.test.ts` calls each
 * one and fails when the proto has a method the client lacks. Failures
 * reject with a {@link KeywardError} carrying the gRPC code; batch calls
 * resolve to one result per item, a value or a `KeywardError`.
 */

import {
  credentials as grpcCredentials,
  type CallOptions,
  type ChannelCredentials,
  type Interceptor,
  Metadata,
  type ServiceError,
  status as Status,
} from "@grpc/grpc-js";

import {
  ActivateKeyRequest,
  type ActivateKeyResponse,
  AdminClient,
  CreateKeyRequest,
  type GetKeyUsageResponse,
  type Key,
  type RefreshKeyMetadataResponse,
  type Replica,
  RetireKeyRequest,
  type RetireKeyResponse,
  type RotationJob,
  type RotationProgress,
  type RotationTarget,
  type SelfTestResponse,
  StartRotationRequest,
  UpdateRotationRequest,
} from "./gen/keyward/v1/admin.js";
import {
  CryptoClient,
  type DecryptRequest,
  type DecryptResponse,
  type EncryptResponse,
  Envelope,
  EnvelopeForm,
  type ItemError,
  type RewrapRequest,
  type RewrapResponse,
} from "./gen/keyward/v1/crypto.js";

export { Envelope, Status };
export type {
  ActivateKeyResponse,
  GetKeyUsageResponse,
  Interceptor,
  Key,
  RefreshKeyMetadataResponse,
  Replica,
  RetireKeyResponse,
  RotationJob,
  RotationProgress,
  RotationTarget,
  SelfTestResponse,
};
export { KeyStatus, RotationMode, RotationStatus } from "./gen/keyward/v1/admin.js";
/** Every generated message and stub, for what the helpers do not cover. */
export * as admin from "./gen/keyward/v1/admin.js";
export * as crypto from "./gen/keyward/v1/crypto.js";

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

/**
 * A Rewrap's result: the same secret under the active key, bound to the same
 * context; store it in place of what was given.
 */
export interface Rewrapped extends Sealed {
  /** False: it already was on the active key and came back as given. */
  rewrapped: boolean;
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
  /** grpc-js client interceptors (tracing, retries), around every call. */
  interceptors?: Interceptor[];
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
    const stubOptions = { interceptors: options.interceptors ?? [] };
    this.crypto = new CryptoClient(target, creds, stubOptions);
    this.admin = new AdminClient(target, creds, stubOptions);
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

  /**
   * The same secret under the active key, never returned in plaintext (role
   * `rewrap`, which does not grant `decrypt`).
   */
  async rewrap(ciphertext: Ciphertext, context: Context): Promise<Rewrapped> {
    const res = await this.unary(
      this.crypto.rewrap.bind(this.crypto),
      rewrapRequest(ciphertext, context),
    );
    return rewrapped(res);
  }

  /** Rewraps many items in one call; one result per item, in order. */
  async batchRewrap(
    items: Array<{ ciphertext: Ciphertext; context: Context }>,
  ): Promise<Array<Rewrapped | KeywardError>> {
    const res = await this.unary(this.crypto.batchRewrap.bind(this.crypto), {
      items: items.map(({ ciphertext, context }) => rewrapRequest(ciphertext, context)),
    });
    return res.results.map((r) => (r.ok ? rewrapped(r.ok) : itemError(r.error)));
  }

  // Admin (role admin): the key catalog.

  /** Every key record, newest first. */
  async listKeys(): Promise<Key[]> {
    return (await this.unary(this.admin.listKeys.bind(this.admin), {})).keys;
  }

  /** Registers a key record (`pending`, or `active` with `activate`). */
  createKey(request: Partial<CreateKeyRequest> & { keyId: string }): Promise<Key> {
    return this.unary(this.admin.createKey.bind(this.admin), CreateKeyRequest.fromPartial(request));
  }

  /**
   * Makes a key active (`staged`: once every live replica proves it can
   * decrypt under it); the previous active key becomes rotating.
   */
  activateKey(keyId: string, options: Partial<ActivateKeyRequest> = {}): Promise<ActivateKeyResponse> {
    const request = ActivateKeyRequest.fromPartial({ ...options, keyId });
    return this.unary(this.admin.activateKey.bind(this.admin), request);
  }

  /** Retires a rotating key (`dryRun`: only the plan; `force`). */
  retireKey(keyId: string, options: Partial<RetireKeyRequest> = {}): Promise<RetireKeyResponse> {
    const request = RetireKeyRequest.fromPartial({ ...options, keyId });
    return this.unary(this.admin.retireKey.bind(this.admin), request);
  }

  /** Every keyward process that heartbeats into the database. */
  async listReplicas(): Promise<Replica[]> {
    return (await this.unary(this.admin.listReplicas.bind(this.admin), {})).replicas;
  }

  /** Re-encryption debt: per key, the rows of each target still on it. */
  getKeyUsage(): Promise<GetKeyUsageResponse> {
    return this.unary(this.admin.getKeyUsage.bind(this.admin), {});
  }

  /** Reloads the server's in-memory key catalog from the database. */
  refreshKeyMetadata(): Promise<RefreshKeyMetadataResponse> {
    return this.unary(this.admin.refreshKeyMetadata.bind(this.admin), {});
  }

  /** Round-trips a probe through every non-retired key's KMS. */
  selfTest(): Promise<SelfTestResponse> {
    return this.unary(this.admin.selfTest.bind(this.admin), {});
  }

  /** Removes expired or used connection-scoped tokens; resolves to how many. */
  async pruneExpiredScopedTokens(): Promise<number> {
    return (await this.unary(this.admin.pruneExpiredScopedTokens.bind(this.admin), {})).removed;
  }

  // Admin: rotation jobs.

  /** Queues a rotation job; the fields not given take their proto defaults. */
  startRotation(request: Partial<StartRotationRequest> = {}): Promise<RotationJob> {
    return this.unary(
      this.admin.startRotation.bind(this.admin),
      StartRotationRequest.fromPartial(request),
    );
  }

  /** One job as it stands. */
  getRotationJob(jobId: string): Promise<RotationJob> {
    return this.unary(this.admin.getRotationJob.bind(this.admin), { jobId });
  }

  /** {@link getRotationJob}, under its earlier name. */
  rotationJob(jobId: string): Promise<RotationJob> {
    return this.getRotationJob(jobId);
  }

  /** Jobs, newest first (`limit` 0: the server's default). */
  async listRotationJobs(limit = 0): Promise<RotationJob[]> {
    return (await this.unary(this.admin.listRotationJobs.bind(this.admin), { limit })).jobs;
  }

  /** Cancels a job: a pending one at once, a running one between batches. */
  cancelRotation(jobId: string): Promise<RotationJob> {
    return this.unary(this.admin.cancelRotation.bind(this.admin), { jobId });
  }

  /** Puts a failed or cancelled job back in the queue. */
  requeueRotation(jobId: string): Promise<RotationJob> {
    return this.unary(this.admin.requeueRotation.bind(this.admin), { jobId });
  }

  /** Pauses a pending or running job: it claims nothing and keeps its counts. */
  pauseRotation(jobId: string): Promise<RotationJob> {
    return this.unary(this.admin.pauseRotation.bind(this.admin), { jobId });
  }

  /** Resumes a paused job where it stopped. */
  resumeRotation(jobId: string): Promise<RotationJob> {
    return this.unary(this.admin.resumeRotation.bind(this.admin), { jobId });
  }

  /**
   * Re-tunes a pending or running job from its next batch on; the fields
   * not given stay as they are.
   */
  updateRotation(
    jobId: string,
    changes: Omit<Partial<UpdateRotationRequest>, "jobId">,
  ): Promise<RotationJob> {
    const request = UpdateRotationRequest.fromPartial({ ...changes, jobId });
    return this.unary(this.admin.updateRotation.bind(this.admin), request);
  }

  /**
   * The job's progress: its state at once, then an event per change (or
   * every second); ends after the terminal event. Leaving the loop early
   * cancels the call.
   */
  async *watchRotation(jobId: string): AsyncGenerator<RotationProgress> {
    const stream = this.admin.watchRotation({ jobId }, this.metadata);
    try {
      for await (const event of stream) yield event as RotationProgress;
    } catch (err) {
      throw KeywardError.from(err as ServiceError);
    } finally {
      // A caller that stops reading early ends the call (a no-op after the
      // terminal event).
      stream.cancel();
    }
  }

  // Admin: rotation targets.

  /** The rotation targets every process follows, in the order rotation walks them. */
  async listRotationTargets(): Promise<RotationTarget[]> {
    return (await this.unary(this.admin.listRotationTargets.bind(this.admin), {})).targets;
  }

  /**
   * Lists a table: its definition as a `--rotation-targets` entry spells it
   * (JSON text, or an object); resolves to the targets after the change.
   */
  async addRotationTarget(definition: string | object): Promise<RotationTarget[]> {
    const definitionJson = typeof definition === "string" ? definition : JSON.stringify(definition);
    const res = await this.unary(this.admin.addRotationTarget.bind(this.admin), { definitionJson });
    return res.targets;
  }

  /** Stops listing a table (`force`: even while it holds envelopes). */
  async removeRotationTarget(table: string, force = false): Promise<RotationTarget[]> {
    const res = await this.unary(this.admin.removeRotationTarget.bind(this.admin), { table, force });
    return res.targets;
  }
}

function rewrapped(res: RewrapResponse): Rewrapped {
  return { ...sealed(res), rewrapped: res.rewrapped };
}

function rewrapRequest(ciphertext: Ciphertext, context: Context): RewrapRequest {
  const form = EnvelopeForm.ENVELOPE_FORM_BOTH;
  return ciphertext instanceof Uint8Array
    ? { context, blob: Buffer.from(ciphertext), form }
    : { context, envelope: ciphertext, form };
}

function sealed(res: EncryptResponse | RewrapResponse): Sealed {
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
