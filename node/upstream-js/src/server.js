// UpstreamServer: a grpc-js server implementing pmlb.v1.Upstream with your
// handler, plus grpc.health.v1.Health (the service the checker asks about).
import { timingSafeEqual } from 'node:crypto';

import * as grpc from '@grpc/grpc-js';
import { HealthImplementation } from 'grpc-health-check';

import { BRIDGE_PATH, GARBAGE, decodeBatch, encodeBatch } from './proto.js';
import { BackpressureError, MarkGone } from './errors.js';
import { DEFAULT_WINDOW, PROTOCOL_VERSION, Session, handlingConn, nodeOf } from './session.js';
import { WatchedMarks } from './tracking.js';
import { BatchWriter, FRAME_OVERHEAD, MAX_ATOMIC_BYTES } from './writer.js';

export const VERSION = '0.1.0';
/** The grpc.health.v1 service name the checker asks about. */
export const HEALTH_SERVICE = 'pmlb.v1.Upstream';
// The node sends gRPC messages up to 64 MiB; gRPC's usual default receive
// limit is 4 MiB, which would end the link on the first big batch.
export const GRPC_MAX_MESSAGE = 64 << 20;
export const DEFAULT_MAX_QUEUE = 4 << 20;
export const DEFAULT_CONCURRENCY = 64;
// A Bridge stream that has not sent its Hello by then is ended
// (DEADLINE_EXCEEDED): a peer opening streams and sending nothing must not
// hold them for ever.
export const DEFAULT_HELLO_TIMEOUT_MS = 10000;
// Bridge streams held at once (each node worker holds one): far above a real
// cluster's (nodes x workers), low enough that a peer opening streams until
// memory runs out is refused first.
export const DEFAULT_MAX_STREAMS = 1024;

/** A loopback address (127.0.0.0/8, ::1, v4-mapped) or localhost. */
export function isLoopback(host) {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  if (h === 'localhost' || h === '::1' || h === '0:0:0:0:0:0:0:1') return true;
  const v4 = h.replace(/^::ffff:/, '');
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(v4);
}

const SERVER_OPTIONS = {
  'grpc.max_receive_message_length': GRPC_MAX_MESSAGE,
  'grpc.max_send_message_length': GRPC_MAX_MESSAGE,
  // Nodes send HTTP/2 keepalive pings every 10 s, also with no call open.
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_ping_interval_without_data_ms': 5000,
};

/** The pmlb.v1.Upstream service for grpc-js, with a decoder that never throws. */
export const BRIDGE_SERVICE = {
  Bridge: {
    path: BRIDGE_PATH,
    requestStream: true,
    responseStream: true,
    requestSerialize: encodeBatch,
    requestDeserialize: decodeBatch,
    responseSerialize: encodeBatch,
    responseDeserialize: decodeBatch,
  },
};

/** One printable line: text a peer chose (a Hello id, a mark) with a newline
 * or an ESC in it cannot forge a log line or drive a terminal. */
export function printable(text) {
  return String(text).replace(
    /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g,
    (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`,
  );
}

/** The logger given (or the default), with every message made one line. */
function oneLine(logger) {
  return {
    info: (msg) => logger.info(printable(msg)),
    warn: (msg) => logger.warn(printable(msg)),
    error: (msg, err) => logger.error(printable(msg), err),
  };
}

function defaultLogger(id) {
  const at = () => new Date().toISOString();
  return {
    info: (msg) => console.log(`${at()} INFO upstream/${id} ${msg}`),
    warn: (msg) => console.warn(`${at()} WARNING upstream/${id} ${msg}`),
    error: (msg, err) =>
      console.error(`${at()} ERROR upstream/${id} ${msg}${err ? `\n${err.stack ?? err}` : ''}`),
  };
}

export class UpstreamServer {
  /**
   * @param {object} handler {onOpen(conn), onMessage(conn, data), onClose(conn, reason)}:
   *   each optional, each may return a promise; and, with watchMarks,
   *   onMark(mark, info) (info null when the mark ended), called from the
   *   stream's reader: keep it short.
   * @param {object} options
   * @param {string} options.upstreamId this upstream's id (in its Hello and logs)
   * @param {string} [options.listen] host:port, default 127.0.0.1:0 (any free port)
   * @param {number} [options.window] credit granted to the node per mark (default 262144)
   * @param {number} [options.maxQueue] bound of each mark's outgoing queue (default 4 MiB)
   * @param {number} [options.concurrency] marks whose handlers run at once per stream
   * @param {string} [options.token] nodes must present it (their --upstream-token);
   *   default PMLB_UPSTREAM_TOKEN
   * @param {grpc.ServerCredentials} [options.credentials] TLS; default insecure
   * @param {object} [options.logger] {info, warn, error}
   * @param {number} [options.helloTimeoutMs] a stream with no Hello by then is
   *   ended (default 10000)
   * @param {boolean} [options.watchMarks] keep `marks`: every mark of the nodes
   *   linked here (bound to any upstream), with its metadata
   * @param {number} [options.maxStreams] Bridge streams held at once; more are
   *   refused with RESOURCE_EXHAUSTED (default 1024)
   * @param {boolean} [options.allowAnonymous] serve beyond loopback with no
   *   token and no credentials (any peer that reaches it can act as a node);
   *   without it, start() refuses to
   */
  constructor(handler, options) {
    const {
      upstreamId,
      listen = '127.0.0.1:0',
      window = DEFAULT_WINDOW,
      maxQueue = DEFAULT_MAX_QUEUE,
      concurrency = DEFAULT_CONCURRENCY,
      helloTimeoutMs = DEFAULT_HELLO_TIMEOUT_MS,
      token = process.env.PMLB_UPSTREAM_TOKEN,
      credentials,
      logger,
      watchMarks = false,
      maxStreams = DEFAULT_MAX_STREAMS,
      allowAnonymous = false,
    } = options ?? {};
    if (!upstreamId) throw new TypeError('upstreamId is required');
    if (!(concurrency >= 1)) throw new RangeError('concurrency must be at least 1');
    this.handler = handler;
    this.upstreamId = upstreamId;
    this.listen = listen;
    this.window = window;
    this.maxQueue = maxQueue;
    this.concurrency = concurrency;
    this.helloTimeoutMs = helloTimeoutMs;
    this.token = token || null;
    this.credentials = credentials ?? grpc.ServerCredentials.createInsecure();
    this._verified = Boolean(this.token) || credentials !== undefined;
    this.allowAnonymous = Boolean(allowAnonymous);
    this.maxStreams = maxStreams;
    this._streamsOpen = 0;
    this._lastRefusalLog = 0;
    this.log = oneLine(logger ?? defaultLogger(upstreamId));
    this.port = 0;
    this.stats = {
      streams: 0,
      garbageBatches: 0,
      framesForUnknownMarks: 0,
      duplicatesSkipped: 0,
      unexpectedFrames: 0,
      refusedByNode: 0,
      pushesRefused: 0,
      handlerErrors: 0,
      unauthenticated: 0,
      helloTimeouts: 0,
      refusedStreams: 0,
      foreignOpens: 0,
    };
    this._marks = new Map();
    this._sessions = new Map(); // node id -> Set<Session>
    this.watchMarks = Boolean(watchMarks);
    /** Every mark of the linked nodes, when watchMarks (a read-only Map). */
    this.marks = new WatchedMarks(
      this.watchMarks && handler.onMark ? (mark, info) => handler.onMark(mark, info) : null,
    );
    this.marks.onError = (msg, err) => this.log.error(msg, err);
    this._atomic = 0;
    this._health = new HealthImplementation({ '': 'SERVING', [HEALTH_SERVICE]: 'SERVING' });
    this._server = null;
  }

  /**
   * The rule of the node's admin and control APIs: without credentials,
   * loopback only. A Bridge peer is trusted to be the node its Hello names
   * (it receives that node's pushes and closes); with no token or TLS
   * credentials, anyone who reaches the port is.
   */
  _checkAnonymous() {
    const host = this.listen.slice(0, this.listen.lastIndexOf(':'));
    if (this._verified || this.allowAnonymous || isLoopback(host)) return;
    throw new Error(
      `listen ${this.listen} is not a loopback address and nodes need no credentials: ` +
        "set the nodes' --upstream-token here too (token, PMLB_UPSTREAM_TOKEN) or TLS " +
        'credentials that demand node certificates, listen on 127.0.0.1, or allowAnonymous: ' +
        'true if every peer that can reach it is a node of yours',
    );
  }

  /** Start serving; resolves to the port. */
  async start() {
    this._checkAnonymous();
    const server = new grpc.Server(SERVER_OPTIONS);
    server.addService(BRIDGE_SERVICE, { Bridge: (call) => this._bridge(call) });
    this._health.addToServer(server);
    this.port = await new Promise((resolve, reject) => {
      server.bindAsync(this.listen, this.credentials, (err, port) =>
        err ? reject(err) : resolve(port),
      );
    });
    this._server = server;
    this.log.info(`serving pmlb.v1.Upstream on port ${this.port} (grpc-js)`);
    return this.port;
  }

  /** Stop: let streams end for up to graceMs, then cut them. */
  async stop(graceMs = 1000) {
    const server = this._server;
    if (!server) return;
    this._server = null;
    await new Promise((resolve) => {
      const timer = setTimeout(() => {
        server.forceShutdown();
        resolve();
      }, graceMs);
      server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /** Flip what grpc.health.v1 reports: checkers stop routing to NOT_SERVING. */
  setServing(serving) {
    const status = serving ? 'SERVING' : 'NOT_SERVING';
    this._health.setStatus('', status);
    this._health.setStatus(HEALTH_SERVICE, status);
  }

  /** The Conn of a mark bound here, if any. */
  conn(mark) {
    return this._marks.get(mark);
  }

  /**
   * Send one message to a mark bound here, or to any mark of a node this
   * upstream has a link with (the node must list this upstream in
   * --push-upstreams for marks bound elsewhere). Returns a promise that
   * resolves when the node has accepted the message (it is in the client's
   * write buffer) and rejects with MarkGone (not open, or no link to its
   * node: this SDK does not wrap the control API) or PushRefused (the node
   * did not permit it, or the link ended before the node confirmed it).
   *
   * The message is on its way when push returns: awaiting is only for
   * knowing it was accepted, so many pushes can be awaited together
   * (Promise.all), confirmed by one round trip per node; a rejection nobody
   * awaits is counted (stats.pushesRefused), never unhandled. A push is not
   * held for credit: the node bounds it by the client's write buffer.
   */
  push(mark, payload) {
    try {
      const buf = typeof payload === 'string' ? Buffer.from(payload) : payload;
      const conn = this._marks.get(mark);
      if (conn && !this._reroute(conn)) {
        conn._push(buf);
        return conn._session.barriers.track(mark);
      }
      const session = this._sessionFor(mark);
      const writer = session.writer;
      const size = buf.length + FRAME_OVERHEAD;
      if (writer.held && writer.openBytes + size > MAX_ATOMIC_BYTES) {
        throw new BackpressureError(`more than ${MAX_ATOMIC_BYTES} bytes pushed in one atomic()`);
      }
      const f = writer.frame();
      f.mark = mark;
      f.data = { payload: buf };
      writer.addPayload(size);
      writer.kick();
      return session.barriers.track(mark);
    } catch (err) {
      const failed = Promise.reject(err);
      failed.catch(() => {});
      return failed;
    }
  }

  /**
   * Run `fn` (synchronous: no await inside) so that the frames it makes
   * (pushes, sends, metadata) reach each node in one Batch, which the node
   * applies whole or not at all: if this process dies, a node has either all
   * of them or none. At most 32 MiB per node. Returns what `fn` returns.
   */
  atomic(fn) {
    const held = [];
    for (const sessions of this._sessions.values()) {
      for (const s of sessions) held.push([s.writer, s.writer.hold()]);
    }
    this._atomic += 1;
    let result;
    try {
      result = fn();
    } finally {
      this._atomic -= 1;
      for (const [writer, token] of held) writer.release(token);
    }
    if (result !== null && typeof result === 'object' && typeof result.then === 'function') {
      throw new TypeError(
        'atomic() takes a synchronous function: its frames after an await are not held',
      );
    }
    return result;
  }

  /**
   * Resolves when `streams` node streams (one per node, or per worker of a
   * node) have sent their whole list of marks (watchMarks).
   */
  async marksSynced(streams = 1, timeoutMs = 10000) {
    if (!this.watchMarks) throw new Error('marksSynced() needs the watchMarks option');
    await this.marks.synced(streams, timeoutMs);
  }

  /** Inside atomic(), a push to a mark bound here over another stream of the
   * same node (another worker's link) goes on the handler's own stream, so
   * it lands in the same Batch (the node forwards it to the right worker). */
  _reroute(conn) {
    if (!this._atomic) return false;
    const h = handlingConn();
    if (!h || h.closed) return false;
    const own = h._session;
    return own !== conn._session && own.nodeId === conn._session.nodeId;
  }

  /** Close any mark reachable as with push. */
  closeMark(mark, reason = 'upstream_closed', detail = '') {
    const conn = this._marks.get(mark);
    if (conn) {
      conn.close(reason, detail);
      return;
    }
    this._sessionFor(mark).sendClose(mark, reason, detail);
  }

  /** A live stream to the node owning `mark`: the one of the mark being
   * handled when it is to the same node, so what a handler sends goes in
   * order (and in one atomic() Batch) with its replies. */
  _sessionFor(mark) {
    const node = nodeOf(mark);
    const h = handlingConn();
    if (h && !h.closed && h._session.nodeId === node && !h._session.ended) return h._session;
    for (const s of this._sessions.get(node) ?? []) if (!s.ended) return s;
    throw new MarkGone(`no link to the node owning ${mark}`);
  }

  _authorized(call) {
    if (!this.token) return true;
    const given = Buffer.from(String(call.metadata.get('authorization')[0] ?? ''));
    const want = Buffer.from(`Bearer ${this.token}`);
    return given.length === want.length && timingSafeEqual(given, want);
  }

  _bridge(call) {
    if (this._streamsOpen >= this.maxStreams) {
      this.stats.refusedStreams += 1;
      const now = Date.now();
      if (now - this._lastRefusalLog >= 1000) {
        // A flood makes one line a second.
        this._lastRefusalLog = now;
        this.log.warn(
          `refused a Bridge stream from ${call.getPeer()}: ${this._streamsOpen} open, the most (maxStreams); ${this.stats.refusedStreams} refused so far`,
        );
      }
      call.emit('error', {
        code: grpc.status.RESOURCE_EXHAUSTED,
        details: 'too many Bridge streams',
      });
      return;
    }
    this._streamsOpen += 1;
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this._streamsOpen -= 1;
    };
    for (const event of ['close', 'error', 'cancelled', 'finish']) call.on(event, release);
    if (!this._authorized(call)) {
      this.stats.unauthenticated += 1;
      this.log.warn(`refused a Bridge stream without the upstream token from ${call.getPeer()}`);
      call.emit('error', { code: grpc.status.UNAUTHENTICATED, details: 'upstream token required' });
      return;
    }
    let session = null;
    let ended = false;
    // No Hello in time: end the stream (a peer must not hold it open idle).
    const helloTimer = setTimeout(() => {
      if (session !== null || ended) return;
      ended = true;
      this.stats.helloTimeouts += 1;
      this.log.warn(
        `ended a Bridge stream from ${call.getPeer()} that sent no Hello within ${this.helloTimeoutMs} ms (${this.stats.helloTimeouts} so far)`,
      );
      call.emit('error', { code: grpc.status.DEADLINE_EXCEEDED, details: 'no Hello in time' });
    }, this.helloTimeoutMs);
    helloTimer.unref?.();
    let writer = null;
    const write = (batch) =>
      new Promise((resolve, reject) => {
        if (ended) {
          reject(new Error('stream ended'));
          return;
        }
        call.write(batch, (err) => (err ? reject(err) : resolve()));
      });

    const finish = (reason) => {
      if (ended) return;
      ended = true;
      if (!session) return;
      writer.close();
      const peers = this._sessions.get(session.nodeId);
      peers?.delete(session);
      if (peers?.size === 0) this._sessions.delete(session.nodeId); // ids of nodes gone
      this.log.info(
        `node ${session.nodeId} stream ended (${reason}); ${session.conns.size} marks released`,
      );
      session.end(reason).catch((err) => this.log.error('ending a session failed', err));
    };

    // A bug in this SDK (not in a handler: those are caught per mark) ends
    // this stream with INTERNAL; the node moves its marks and reconnects,
    // and the process and its other streams carry on.
    const apply = (batch) => {
      try {
        session.process(batch);
      } catch (err) {
        this.log.error(`node ${session.nodeId}: processing a batch failed; ending the stream`, err);
        finish('sdk_error');
        call.emit('error', { code: grpc.status.INTERNAL, details: 'upstream SDK error' });
      }
    };

    call.on('data', (batch) => {
      if (ended) return;
      if (session === null) {
        clearTimeout(helloTimer);
        if (batch === GARBAGE || !batch.hello) {
          ended = true;
          call.emit('error', {
            code: grpc.status.INVALID_ARGUMENT,
            details: 'first Batch must carry hello',
          });
          return;
        }
        const hello = batch.hello;
        writer = new BatchWriter(write);
        writer.current.hello = {
          id: this.upstreamId,
          protocol: PROTOCOL_VERSION,
          initialWindow: this.window,
          software: `pmlb-upstream-node/${VERSION}`,
          watchMarks: this.watchMarks,
        };
        session = new Session({
          handler: this.handler,
          writer,
          hello,
          window: this.window,
          maxQueue: this.maxQueue,
          concurrency: this.concurrency,
          stats: this.stats,
          log: (msg, err) => this.log.error(msg, err),
          marks: this._marks,
          watched: this.watchMarks ? this.marks : null,
        });
        this.stats.streams += 1;
        if (!this._sessions.has(hello.id)) this._sessions.set(hello.id, new Set());
        this._sessions.get(hello.id).add(session);
        writer.kick();
        this.log.info(`node ${hello.id} connected (protocol ${hello.protocol}, ${hello.software})`);
        apply(batch);
        return;
      }
      if (batch === GARBAGE) {
        this.stats.garbageBatches += 1;
        this.log.warn(`node ${session.nodeId} sent a batch that is not a pmlb.v1.Batch`);
        return;
      }
      apply(batch);
    });
    call.on('end', () => {
      const wasOpen = !ended;
      finish('node_closed');
      if (wasOpen && writer) {
        writer.flush().finally(() => call.end());
      } else {
        call.end();
      }
    });
    call.on('error', () => finish('node_lost'));
    call.on('cancelled', () => finish('node_lost'));
  }
}
