// Type declarations of @pmlb/upstream (the SDK is plain ES modules: src/).
// Checked by `npm run types` (tsc --noEmit on types/check.ts) and used by
// TypeScript projects that install the package.

import type { ServerCredentials } from '@grpc/grpc-js';

export const VERSION: string;
/** The grpc.health.v1 service name the checker asks about. */
export const HEALTH_SERVICE: string;
/** The largest gRPC message either side accepts (64 MiB). */
export const GRPC_MAX_MESSAGE: number;
export const PROTOCOL_VERSION: number;
export const DEFAULT_WINDOW: number;
export const FRAME_OVERHEAD: number;
/** The most payload one atomic() may carry per node. */
export const MAX_ATOMIC_BYTES: number;

/** The node id a mark names (`<node id>.<boot>.<counter>`); MarkGone if not a mark. */
export function nodeOf(mark: string): string;

export type Payload = Buffer | Uint8Array | string;

/** One mark, as this upstream sees it while the mark is bound here. */
export class Conn {
  readonly mark: string;
  readonly service: string;
  readonly clientAddr: string;
  readonly clientPort: number;
  readonly nodeId: string;
  /** The mark's metadata as the node holds it (also on a resumed mark). */
  readonly metadata: Record<string, string>;
  /** True when the mark was moved here from another upstream. */
  readonly resumed: boolean;
  readonly traceContext: Record<string, string>;
  readonly framing: string;
  /** The node's --max-frame and --max-meta for this mark (0: not told). */
  readonly maxFrame: number;
  readonly maxMeta: number;
  readonly listener: string;
  readonly acceptedAtUnixMs: number;
  /** The sequence number of the message being handled (idempotency key with mark). */
  readonly seq: number;
  readonly closed: boolean;
  /** Free for the application. */
  state: unknown;
  /** One message to the mark's client; BackpressureError past maxQueue. */
  send(payload: Payload): void;
  /** Resolves once the node has applied everything sent on this mark so far. */
  accepted(): Promise<void>;
  /** Hold this message's acknowledgement until done() (call before replying). */
  defer(): () => void;
  close(reason?: string, detail?: string): void;
  setMeta(values: Record<string, string>): void;
  unsetMeta(...keys: string[]): void;
}

/** A mark of a linked node, as a watching upstream sees it (watchMarks). */
export interface MarkInfo {
  mark: string;
  nodeId: string;
  upstream: string;
  clientAddr: string;
  clientPort: number;
  acceptedAtUnixMs: number;
  metadata: Record<string, string>;
}

/** Every mark of the nodes linked here (watchMarks): a read-only map. */
export class WatchedMarks implements Iterable<[string, MarkInfo]> {
  readonly size: number;
  get(mark: string): MarkInfo | undefined;
  has(mark: string): boolean;
  keys(): IterableIterator<string>;
  values(): IterableIterator<MarkInfo>;
  entries(): IterableIterator<[string, MarkInfo]>;
  [Symbol.iterator](): IterableIterator<[string, MarkInfo]>;
}

/** What the application implements; every method is optional. */
export interface Handler {
  onOpen?(conn: Conn): void | Promise<void>;
  onMessage?(conn: Conn, data: Buffer): void | Promise<void>;
  onClose?(conn: Conn, reason: string): void | Promise<void>;
  /** A watched mark opened or changed (info), or ended (null). Keep it short. */
  onMark?(mark: string, info: MarkInfo | null): void;
}

export interface Logger {
  info(message: string): void;
  warn(message: string): void;
  error(message: string, err?: unknown): void;
}

export interface UpstreamServerOptions {
  /** This upstream's id (in its Hello and logs). */
  upstreamId: string;
  /** host:port; default 127.0.0.1:0 (any free port). */
  listen?: string;
  /** Credit granted to the node per mark (default 262144). */
  window?: number;
  /** Bound of each mark's outgoing queue (default 4 MiB). */
  maxQueue?: number;
  /** Marks whose handlers run at once per stream (default 64). */
  concurrency?: number;
  /** Nodes must present it (their --upstream-token); default PMLB_UPSTREAM_TOKEN. */
  token?: string;
  /** TLS; default insecure. */
  credentials?: ServerCredentials;
  logger?: Logger;
  /** A stream with no Hello by then is ended (default 10000). */
  helloTimeoutMs?: number;
  /** Keep `marks`: every mark of the linked nodes. */
  watchMarks?: boolean;
  /** Bridge streams held at once (default 1024); more are refused. */
  maxStreams?: number;
  /** Serve beyond loopback with no token and no credentials. */
  allowAnonymous?: boolean;
}

export interface Stats {
  streams: number;
  garbageBatches: number;
  framesForUnknownMarks: number;
  duplicatesSkipped: number;
  unexpectedFrames: number;
  refusedByNode: number;
  pushesRefused: number;
  handlerErrors: number;
  unauthenticated: number;
  helloTimeouts: number;
  refusedStreams: number;
  foreignOpens: number;
}

export class UpstreamServer {
  constructor(handler: Handler, options: UpstreamServerOptions);
  readonly upstreamId: string;
  readonly listen: string;
  /** The port served on, once started. */
  readonly port: number;
  readonly stats: Stats;
  readonly marks: WatchedMarks;
  /** Start serving; resolves to the port. */
  start(): Promise<number>;
  /** Stop: let streams end for up to graceMs (default 1000), then cut them. */
  stop(graceMs?: number): Promise<void>;
  /** What grpc.health.v1 reports (checkers stop routing to NOT_SERVING). */
  setServing(serving: boolean): void;
  /** The Conn of a mark bound here, if any. */
  conn(mark: string): Conn | undefined;
  /** One message to any mark reachable from here; resolves once the node accepted it. */
  push(mark: string, payload: Payload): Promise<void>;
  /** Frames made inside reach each node in one Batch, applied whole or not at
   * all. Synchronous: a function returning a promise is refused (TypeError). */
  atomic<T>(fn: () => T): T;
  /** Resolves once `streams` node streams have sent their whole list of marks. */
  marksSynced(streams?: number, timeoutMs?: number): Promise<void>;
  /** Close any mark reachable as with push (MarkGone when none is). */
  closeMark(mark: string, reason?: string, detail?: string): void;
}

export class PmlbError extends Error {}
export class BackpressureError extends PmlbError {}
export class MarkGone extends PmlbError {}
export class FrameTooLarge extends PmlbError {}
export class MetadataTooLarge extends PmlbError {}
export class PushRefused extends PmlbError {
  constructor(reason: string, detail?: string);
  readonly reason: string;
  readonly detail: string;
}

/** The Bridge protocol core and its batch writer (exported for tests and tools). */
export class Session {}
export class BatchWriter {}
