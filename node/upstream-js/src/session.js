// One Bridge stream from one node: the protocol (proto/README.md) without the
// gRPC plumbing, so it can be unit-tested with a fake writer.
//
// Handlers of one mark run one at a time, in frame order; handlers of
// different marks run concurrently (a returned promise is awaited before that
// mark's next frame), at most `concurrency` marks at once on the stream. The
// reader never waits for a handler: pings are answered as they are read, and
// frames for a busy mark wait in its inbox (bounded by the credit granted to
// the node), so a slow handler delays only its own mark. A handler that
// throws (or rejects) closes only its mark, with reason "upstream_error".

import { AsyncLocalStorage } from 'node:async_hooks';

import {
  BackpressureError,
  FrameTooLarge,
  MarkGone,
  MetadataTooLarge,
  PmlbError,
  PushRefused,
} from './errors.js';
import { Barriers } from './tracking.js';
import { FRAME_OVERHEAD } from './writer.js';

// The mark whose onMessage is running (its replies acknowledge its message),
// carried through the handler's awaits.
const handling = new AsyncLocalStorage();

/** The Conn whose onMessage is running here, if any (the server's push routing). */
export function handlingConn() {
  return handling.getStore();
}

export const PROTOCOL_VERSION = 2;
export const DEFAULT_WINDOW = 262144;

/** Length as the node counts it: Unicode code points. */
function codePoints(text) {
  let n = 0;
  for (const _ of text) n += 1;
  return n;
}

const OPEN = 0;
const DATA = 1;
const CLOSE = 2;
const HANDLER_NAMES = ['onOpen', 'onMessage', 'onClose'];

/** The node that owns a mark (`<node id>.<boot>.<counter>`; node ids may contain dots). */
export function nodeOf(mark) {
  const parts = mark.split('.');
  if (parts.length < 3) throw new MarkGone(`not a mark: ${JSON.stringify(mark)}`);
  return parts.slice(0, -2).join('.');
}

function ownedBy(mark, nodeId) {
  try {
    return nodeOf(mark) === nodeId;
  } catch {
    return false;
  }
}

function isThenable(x) {
  return x !== null && typeof x === 'object' && typeof x.then === 'function';
}

/** One mark, as this upstream sees it while the mark is bound here. */
export class Conn {
  constructor(session, mark, open) {
    this._session = session;
    this.mark = mark;
    this.service = open.service;
    this.clientAddr = open.clientAddr;
    this.clientPort = open.clientPort;
    this.nodeId = open.nodeId;
    this.metadata = { ...open.metadata };
    this.resumed = open.resumed;
    this.traceContext = { ...open.traceContext };
    this.framing = open.framing;
    // The node's limits for this mark (0: an older node did not say).
    this.maxFrame = open.maxFrame || 0;
    this.maxMeta = open.maxMeta || 0;
    this.listener = open.listener;
    this.acceptedAtUnixMs = Number(open.acceptedAtUnixMs);
    // seq: the sequence number of the message being handled; with mark, the
    // idempotency key of the handler's effects (stable across replays).
    const before = Math.max(0, Number(open.nextSeq) - 1);
    this.seq = 0;
    this.lastSeq = before; // highest seq whose handler has started (acked on replies)
    this._doneSeq = before; // highest seq whose handler has finished
    this._recvSeq = before; // highest seq received: replays at or below it are skipped
    this.closed = false;
    this.state = undefined; // free for the application
    this._credit = session.peerWindow;
    this._owed = 0;
    this._ackedSent = before;
    // Messages whose handler deferred their acknowledgement (defer()):
    // nothing at or above the lowest is acknowledged until it is done.
    this._deferred = new Set();
    this._queue = [];
    this._queuedBytes = 0;
    this._inbox = [];
    this._busy = false;
  }

  /**
   * Send one message to the mark's client. Never blocks: without credit it
   * waits in a queue bounded by the server's maxQueue (length + 64 per
   * message); past that BackpressureError is thrown. A payload over the
   * node's maxFrame throws FrameTooLarge (the node would not deliver it).
   */
  send(payload) {
    if (this.closed) throw new MarkGone(`mark ${this.mark} is closed`);
    const buf = typeof payload === 'string' ? Buffer.from(payload) : payload;
    if (this.maxFrame && buf.length > this.maxFrame) {
      throw new FrameTooLarge(
        `frame of ${buf.length} bytes exceeds the limit of ${this.maxFrame} bytes`,
      );
    }
    // A reply from this mark's own handler acknowledges the message being
    // handled; a send from anywhere else (another mark's handler, a timer)
    // only what this mark's handlers have finished.
    const acked = handling.getStore() === this ? this.lastSeq : this._doneSeq;
    if (this._queue.length || this._credit <= 0) {
      const cost = buf.length + FRAME_OVERHEAD;
      if (this._queuedBytes + cost > this._session.maxQueue) {
        throw new BackpressureError(`mark ${this.mark}: outgoing queue full`);
      }
      this._queuedBytes += cost;
      this._queue.push([buf, acked]);
      return;
    }
    this._emit(buf, acked);
  }

  /**
   * A push to this mark (UpstreamServer.push): written now, not held for
   * credit (the node bounds it by the client's write buffer), after anything
   * queued before it.
   */
  _push(buf) {
    if (this.closed) throw new MarkGone(`mark ${this.mark} is closed`);
    if (this.maxFrame && buf.length > this.maxFrame) {
      throw new FrameTooLarge(
        `frame of ${buf.length} bytes exceeds the limit of ${this.maxFrame} bytes`,
      );
    }
    if (this._queue.length) this._flushQueue(true);
    this._emit(buf, handling.getStore() === this ? this.lastSeq : this._doneSeq);
  }

  /**
   * Resolves when the node has applied everything this upstream sent on the
   * mark's stream so far: replies in the client's write buffer, metadata set
   * (and told to upstreams that watch marks), pushes made from this mark's
   * handlers accepted. Rejects with PushRefused when the link ends first, or
   * when the node refused one of this mark's frames. On a node older than
   * this SDK, resolves at once.
   */
  accepted() {
    return this._session.barriers.track(this.mark);
  }

  /**
   * Hold this message's acknowledgement until the returned done() is called,
   * even after the handler returns and its replies are sent. Call it in
   * onMessage before any reply. Until done(), the node keeps the message (and
   * every later one of this mark) for replay: if this upstream dies first, the
   * next one receives it again.
   */
  defer() {
    if (handling.getStore() !== this) {
      throw new PmlbError("defer() belongs in this mark's own onMessage");
    }
    const seq = this.seq;
    if (seq && this._ackedSent >= seq) {
      throw new PmlbError(
        `mark ${this.mark}: seq ${seq} was acknowledged already (by a reply): call defer() before replying`,
      );
    }
    this._deferred.add(seq);
    return () => {
      this._deferred.delete(seq);
      if (!this.closed) this._settle();
    };
  }

  /** The highest acknowledgement allowed: below every deferred message. */
  _clamp(acked) {
    if (!this._deferred.size) return acked;
    return Math.min(acked, Math.min(...this._deferred) - 1);
  }

  _emit(buf, ackedWanted) {
    const acked = this._clamp(ackedWanted);
    const s = this._session;
    this._credit -= buf.length + s.overhead;
    const data = { payload: buf };
    if (acked) {
      data.acked = acked;
      this._ackedSent = Math.max(this._ackedSent, acked);
    }
    const f = s.writer.frame();
    f.mark = this.mark;
    f.data = data;
    s.writer.addPayload(buf.length + FRAME_OVERHEAD);
    s.writer.kick();
  }

  /** Close the mark: the node flushes what it has to the client, then closes it. */
  close(reason = 'upstream_closed', detail = '') {
    if (this.closed) return;
    this._flushQueue(true);
    this._session.sendClose(this.mark, reason, detail);
    this._session.forget(this);
  }

  /**
   * Set metadata on the mark; the node hands it to every later upstream.
   * Throws MetadataTooLarge when the mark's metadata would exceed the node's
   * maxMeta (the sum of key and value lengths); nothing is changed then.
   */
  setMeta(values) {
    if (this.maxMeta) {
      const after = { ...this.metadata, ...values };
      let size = 0;
      for (const [k, v] of Object.entries(after)) size += codePoints(k) + codePoints(v);
      if (size > this.maxMeta) {
        throw new MetadataTooLarge(
          `mark ${this.mark}: metadata of ${size} bytes exceeds the node's limit of ${this.maxMeta}`,
        );
      }
    }
    Object.assign(this.metadata, values);
    const f = this._session.writer.frame();
    f.mark = this.mark;
    f.meta = { set: { ...values } };
    this._session.writer.kick();
  }

  unsetMeta(...keys) {
    for (const k of keys) delete this.metadata[k];
    const f = this._session.writer.frame();
    f.mark = this.mark;
    f.meta = { unset: keys };
    this._session.writer.kick();
  }

  _onCredit(credit) {
    this._credit += credit;
    this._flushQueue(false);
  }

  _flushQueue(force) {
    while (this._queue.length && (force || this._credit > 0)) {
      const [buf, acked] = this._queue.shift();
      this._queuedBytes -= buf.length + FRAME_OVERHEAD;
      this._emit(buf, acked);
    }
  }

  /** Acknowledge finished work and grant its credit back, unless our queue
   * towards the client is long (that is what slows a fast sender to the
   * speed of a slow reader). */
  _settle() {
    const s = this._session;
    if (this.closed || this._queuedBytes >= s.peerWindow) return;
    const done = this._clamp(this._doneSeq);
    const ackDue = !this._queue.length && this._ackedSent < done;
    if (this._owed >= s.grantThreshold || ackDue) {
      const flow = {};
      if (this._owed) {
        flow.credit = this._owed;
        this._owed = 0;
      }
      if (ackDue) {
        flow.acked = done;
        this._ackedSent = done;
      }
      const f = s.writer.frame();
      f.mark = this.mark;
      f.flow = flow;
      s.writer.kick();
    }
  }
}

export class Session {
  /**
   * @param {object} opts
   * @param {object} opts.handler {onOpen, onMessage, onClose}, each optional
   * @param {import('./writer.js').BatchWriter} opts.writer
   * @param {object} opts.hello the node's Hello
   * @param {number} opts.window the window this upstream grants per mark
   * @param {number} opts.maxQueue bound of each mark's outgoing queue
   * @param {number} opts.concurrency marks whose handlers may run at once
   * @param {object} opts.stats counters, shared with the server
   * @param {(msg: string, err?: unknown) => void} opts.log
   * @param {Map<string, Conn>} [opts.marks] the server's marks, kept current
   * @param {import('./tracking.js').WatchedMarks} [opts.watched] the server's
   *   view of the node's marks, when it asked to watch them
   */
  constructor({
    handler,
    writer,
    hello,
    window,
    maxQueue,
    concurrency,
    stats,
    log,
    marks,
    watched,
  }) {
    this.handler = handler;
    this.writer = writer;
    this.nodeId = hello.id;
    this.peerWindow = hello.initialWindow || DEFAULT_WINDOW;
    const protocol = Math.min(hello.protocol || 1, PROTOCOL_VERSION);
    this.overhead = protocol >= 2 ? FRAME_OVERHEAD : 0;
    this.grantThreshold = Math.max(1, Math.floor(window / 2));
    this.maxQueue = maxQueue;
    this.concurrency = concurrency;
    this.stats = stats;
    this.log = log;
    this.conns = new Map();
    this.serverMarks = marks ?? new Map();
    this.running = 0;
    this.ready = [];
    this.ended = false;
    // The server's view of the node's marks (watchMarks), or null.
    this.watched = watched ?? null;
    this.barriers = new Barriers((id) => {
      const f = this.writer.frame();
      f.ping = { id };
      this.writer.kick();
    }, Boolean(hello.answersPings));
  }

  sendClose(mark, reason, detail) {
    const f = this.writer.frame();
    f.mark = mark;
    f.close = detail ? { reason, detail } : { reason };
    this.writer.kick();
  }

  forget(conn) {
    conn.closed = true;
    conn._inbox = [];
    if (this.conns.get(conn.mark) === conn) this.conns.delete(conn.mark);
    if (this.serverMarks.get(conn.mark) === conn) this.serverMarks.delete(conn.mark);
  }

  /** Apply one received Batch: frames in order, handlers started, not awaited. */
  process(batch) {
    const touched = new Set();
    for (const f of batch.frames) {
      const mark = f.mark;
      switch (f.kind) {
        case 'data': {
          const conn = this.conns.get(mark);
          if (!conn) {
            this.stats.framesForUnknownMarks += 1;
            break;
          }
          const payload = Buffer.from(f.data.payload);
          const cost = payload.length + this.overhead;
          touched.add(conn);
          const seq = Number(f.data.seq);
          if (seq) {
            if (seq <= conn._recvSeq) {
              this.stats.duplicatesSkipped += 1;
              conn._owed += cost; // not handled again, but its credit returns
              break;
            }
            conn._recvSeq = seq;
          }
          this._submit(conn, [DATA, seq, payload, cost]);
          break;
        }
        case 'open': {
          if (!ownedBy(mark, this.nodeId)) {
            // A node opens only its own marks: a peer naming another node's
            // mark would take its pushes and closes here.
            this.stats.foreignOpens += 1;
            if (this.stats.foreignOpens === 1 || this.stats.foreignOpens % 1000 === 0) {
              this.log(
                `node ${this.nodeId} opened ${JSON.stringify(mark)}, a mark of another node; ignored (${this.stats.foreignOpens} so far)`,
              );
            }
            break;
          }
          const old = this.conns.get(mark);
          if (old) this.forget(old);
          const conn = new Conn(this, mark, f.open);
          this.conns.set(mark, conn);
          this.serverMarks.set(mark, conn);
          this._submit(conn, [OPEN, 0, null, 0]);
          break;
        }
        case 'flow': {
          const conn = this.conns.get(mark);
          const credit = Number(f.flow.credit);
          if (conn && credit) {
            conn._onCredit(credit);
            touched.add(conn);
          }
          break;
        }
        case 'close': {
          const conn = this.conns.get(mark);
          if (!conn) {
            if (f.close.reason === 'unknown_mark' && this.barriers.gone(mark)) {
              this.stats.pushesRefused = (this.stats.pushesRefused ?? 0) + 1;
            }
            break;
          }
          // Answered once its earlier messages are handled: a "moved" mark
          // gets its replies first, then this close. unknown_mark needs none.
          const answer = f.close.reason !== 'unknown_mark';
          this._submit(conn, [CLOSE, answer ? 0 : -1, f.close.reason, 0]);
          break;
        }
        case 'ping': {
          if (!f.ping.reply) {
            const r = this.writer.frame();
            r.ping = { id: f.ping.id, reply: true };
            this.writer.kick();
          } else {
            this.barriers.answered(Number(f.ping.id));
          }
          break;
        }
        case 'markEvent': {
          if (this.watched) this.watched.apply(this, this.nodeId, mark, f.markEvent);
          else this.stats.unexpectedFrames += 1;
          break;
        }
        case 'refused': {
          // A frame of ours the node did not apply: a push it does not permit
          // fails that push; anything else is a bug worth a line in the log
          // (we check the node's limits before sending).
          this.stats.refusedByNode = (this.stats.refusedByNode ?? 0) + 1;
          const r = f.refused;
          const why = String(r.reason).slice(0, 64);
          if (this.barriers.refuse(mark, new PushRefused(why, `mark ${mark}`))) {
            // The caller's promise says so.
            this.stats.pushesRefused = (this.stats.pushesRefused ?? 0) + 1;
            break;
          }
          this.log(
            `mark=${mark} the node refused a frame: ${String(r.reason).slice(0, 64)} (${r.size} bytes, limit ${r.limit})`,
          );
          break;
        }
        default:
          this.stats.unexpectedFrames += 1;
      }
    }
    for (const conn of touched) conn._settle();
  }

  _submit(conn, work) {
    if (conn._busy) {
      conn._inbox.push(work);
      return;
    }
    let result;
    try {
      result = this._call(conn, work);
    } catch (err) {
      this._failed(conn, work, err);
      return;
    }
    if (isThenable(result)) {
      conn._busy = true;
      if (this.running < this.concurrency) this._spawn(conn, result, work);
      else this.ready.push([conn, result, work]);
      return;
    }
    this._done(conn, work);
  }

  _call(conn, [kind, seq, arg]) {
    const h = this.handler;
    if (kind === DATA) {
      if (conn.closed) return undefined;
      conn.seq = seq;
      if (seq) conn.lastSeq = seq;
      return handling.run(conn, () => h.onMessage?.(conn, arg));
    }
    if (kind === OPEN) return h.onOpen?.(conn);
    if (conn.closed) return undefined;
    this.forget(conn);
    return h.onClose?.(conn, arg);
  }

  _done(conn, [kind, seq, , cost]) {
    if (kind === DATA) {
      conn._doneSeq = Math.max(conn._doneSeq, seq);
      conn._owed += cost;
    } else if (kind === CLOSE && seq === 0) {
      this.sendClose(conn.mark, 'upstream_closed', 'close acknowledged');
    }
  }

  _failed(conn, [kind], err) {
    const name = HANDLER_NAMES[kind];
    this.stats.handlerErrors += 1;
    if (kind === CLOSE) {
      this.log(`mark=${conn.mark} ${name} threw`, err);
      return;
    }
    this.log(`mark=${conn.mark} ${name} threw; closing the mark (upstream_error)`, err);
    if (conn.closed) return;
    conn.close('upstream_error', `${name} threw ${err?.name ?? typeof err}`);
    try {
      const r = this.handler.onClose?.(conn, 'upstream_error');
      if (isThenable(r)) {
        r.then(undefined, (e) => {
          this.stats.handlerErrors += 1;
          this.log(`mark=${conn.mark} onClose threw`, e);
        });
      }
    } catch (e) {
      this.stats.handlerErrors += 1;
      this.log(`mark=${conn.mark} onClose threw`, e);
    }
  }

  _spawn(conn, first, work) {
    this.running += 1;
    this._runMark(conn, first, work);
  }

  /** Finish `first`, then the mark's inbox in order, then give the slot on. */
  async _runMark(conn, first, work) {
    let pending = first;
    try {
      for (;;) {
        if (pending) {
          try {
            await pending;
            this._done(conn, work);
          } catch (err) {
            this._failed(conn, work, err);
          }
          pending = undefined;
        }
        if (!conn._inbox.length || conn.closed) break;
        work = conn._inbox.shift();
        try {
          const r = this._call(conn, work);
          if (isThenable(r)) pending = r;
          else this._done(conn, work);
        } catch (err) {
          this._failed(conn, work, err); // the mark is closed now: the loop ends
        }
      }
    } finally {
      conn._busy = false;
      conn._settle();
      this.running -= 1;
      while (this.ready.length && this.running < this.concurrency) {
        const [next, p, w] = this.ready.shift();
        this._spawn(next, p, w);
      }
    }
  }

  /** The stream ended: every mark on it is gone from here. */
  async end(reason) {
    this.ended = true;
    this.barriers.lost(reason);
    this.watched?.ended(this);
    this.ready = [];
    for (const conn of [...this.conns.values()]) {
      this.forget(conn);
      try {
        await this.handler.onClose?.(conn, reason);
      } catch (err) {
        this.stats.handlerErrors += 1;
        this.log(`mark=${conn.mark} onClose threw`, err);
      }
    }
  }
}
