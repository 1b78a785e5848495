// What an upstream tracks of the node beyond its own marks: which pushes the
// node has accepted (Barriers), and the node's marks it watches (WatchedMarks).
// The same design as the Python SDK's pmlb/upstream/tracking.py.
//
// Accepted means applied by the node: a push is in its client's write buffer
// (or was refused), a metadata change is set. The SDK learns it from a Ping
// it sends after the frames: the node answers once it has applied every frame
// before the Ping on that stream (Hello.answersPings), so one Ping confirms
// every push made before the next microtask checkpoint.

import { MarkGone, PushRefused } from './errors.js';

/** A promise whose rejection nobody has to handle (it is counted instead). */
function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {});
  return { promise, resolve, reject, done: false };
}

function settle(d, err) {
  if (d.done) return false;
  d.done = true;
  if (err) d.reject(err);
  else d.resolve();
  return true;
}

/** One stream's pushes waiting for the node to confirm them. */
export class Barriers {
  /**
   * @param {(id: number) => void} emit puts a Ping request on the stream
   * @param {boolean} answers the node answers our pings (Hello.answersPings)
   */
  constructor(emit, answers) {
    this.emit = emit;
    this.answers = answers;
    this._nextId = 0;
    this._open = null; // [[mark, deferred]] of this turn
    this._sent = []; // [[ping id, [[mark, deferred]]]], oldest first
  }

  /** A promise for a push to `mark` just written on the stream. */
  track(mark) {
    const d = deferred();
    if (!this.answers) {
      // An older node cannot confirm: the push is on its way, no more.
      settle(d);
      return d.promise;
    }
    if (this._open === null) {
      this._open = [];
      // Once the current synchronous stretch is done: everything made before
      // the Ping is what its answer confirms.
      queueMicrotask(() => this._seal());
    }
    this._open.push([mark, d]);
    return d.promise;
  }

  _seal() {
    const pushes = this._open;
    this._open = null;
    if (!pushes || !pushes.length) return;
    this._nextId += 1;
    this._sent.push([this._nextId, pushes]);
    this.emit(this._nextId);
  }

  /** The node applied everything before Ping `id`. */
  answered(id) {
    if (!this._sent.length || id > this._sent[this._sent.length - 1][0]) return false;
    while (this._sent.length && this._sent[0][0] <= id) {
      for (const [, d] of this._sent.shift()[1]) settle(d);
    }
    return true;
  }

  *_waiting() {
    for (const [, pushes] of this._sent) yield pushes;
    if (this._open) yield this._open;
  }

  /** The node refused a push to `mark`: fail the oldest unconfirmed one. */
  refuse(mark, err) {
    for (const pushes of this._waiting()) {
      for (const [m, d] of pushes) if (m === mark && settle(d, err)) return 1;
    }
    return 0;
  }

  /** The node does not know `mark`: every unconfirmed push to it failed. */
  gone(mark) {
    let n = 0;
    for (const pushes of this._waiting()) {
      for (const [m, d] of pushes) {
        if (m === mark && settle(d, new MarkGone(`mark ${mark} is not open on its node`))) n += 1;
      }
    }
    return n;
  }

  /** The stream ended: what it did not confirm may or may not have been applied. */
  lost(why) {
    for (const pushes of this._waiting()) {
      for (const [, d] of pushes) {
        settle(d, new PushRefused('unconfirmed', `the link to the node ended (${why})`));
      }
    }
    this._sent = [];
    this._open = null;
  }
}

/**
 * The marks of every node stream that watches (watchMarks: true): a read-only
 * Map of mark -> {mark, nodeId, upstream, clientAddr, clientPort,
 * acceptedAtUnixMs, metadata}. Each stream reports its own node's (or
 * worker's) marks; a stream that ends takes its marks with it.
 */
export class WatchedMarks {
  constructor(onChange) {
    this._marks = new Map(); // mark -> [info, stream]
    this._byStream = new Map(); // stream -> Set<mark>
    this._synced = new Map(); // stream -> boolean
    this._waiters = [];
    this._onChange = onChange;
    this.onError = null;
  }

  get size() {
    return this._marks.size;
  }

  get(mark) {
    return this._marks.get(mark)?.[0];
  }

  has(mark) {
    return this._marks.has(mark);
  }

  *keys() {
    yield* this._marks.keys();
  }

  *entries() {
    for (const [mark, [info]] of this._marks) yield [mark, info];
  }

  *values() {
    for (const [info] of this._marks.values()) yield info;
  }

  [Symbol.iterator]() {
    return this.entries();
  }

  apply(stream, nodeId, mark, e) {
    const event = e.event;
    if (event === 'open' && mark) {
      const info = Object.freeze({
        mark,
        nodeId,
        upstream: e.upstream || '',
        clientAddr: e.clientAddr || '',
        clientPort: e.clientPort || 0,
        acceptedAtUnixMs: Number(e.acceptedAtUnixMs || 0),
        metadata: Object.freeze({ ...(e.metadata || {}) }),
      });
      this._marks.set(mark, [info, stream]);
      if (!this._byStream.has(stream)) this._byStream.set(stream, new Set());
      this._byStream.get(stream).add(mark);
      this._changed(mark, info);
    } else if (event === 'close' && mark) {
      const held = this._marks.get(mark);
      if (held && held[1] === stream) {
        this._marks.delete(mark);
        this._byStream.get(stream)?.delete(mark);
        this._changed(mark, null);
      }
    } else if (event === 'snapshot') {
      this.forget(stream);
      this._synced.set(stream, false);
    } else if (event === 'synced') {
      this._synced.set(stream, true);
      for (const wake of this._waiters.splice(0)) wake();
    } else {
      this.onError?.(`node ${nodeId} sent a mark event ${JSON.stringify(event)}: ignored`);
    }
  }

  forget(stream) {
    for (const mark of this._byStream.get(stream) ?? []) {
      const held = this._marks.get(mark);
      if (held && held[1] === stream) {
        this._marks.delete(mark);
        this._changed(mark, null);
      }
    }
    this._byStream.delete(stream);
  }

  ended(stream) {
    this.forget(stream);
    this._synced.delete(stream);
  }

  /** Until `streams` node streams have each sent a whole snapshot. */
  async synced(streams, timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const ready = [...this._synced.values()].filter(Boolean).length;
      if (ready >= streams) return;
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `${ready} of ${streams} node streams sent their marks within ${timeoutMs}ms`,
        );
      }
      // Woken by any stream's "synced", or after a short while (a stream that
      // has not connected yet has nothing to wake us with).
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, Math.min(left, 100));
        this._waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  _changed(mark, info) {
    if (!this._onChange) return;
    try {
      this._onChange(mark, info);
    } catch (err) {
      this.onError?.(`mark=${mark} onMark threw`, err);
    }
  }
}
