// Coalesces frames into Batches and writes them on one stream, in order.
//
// frame() returns a new frame object already appended to the open batch; the
// caller fills it in and calls kick() once per burst. One write is in flight
// at a time: while it is, frames accumulate, which is what makes one gRPC
// message carry many frames under load (and none wait at low load).

export const MAX_BATCH_FRAMES = 1024;
export const MAX_BATCH_BYTES = 1 << 20;
// Every Data frame costs its payload length plus this in credit (protocol 2)
// and in the SDK's own queue bounds: an empty message is not free.
export const FRAME_OVERHEAD = 64;
// The most payload one held Batch (hold(), the SDK's atomic()) may carry: half
// of what a peer accepts in one message (64 MiB), leaving room for framing.
export const MAX_ATOMIC_BYTES = 32 << 20;

export class BatchWriter {
  /**
   * @param {(batch: object) => Promise<void>} write sends one Batch; resolves
   *   when the stream can take more.
   */
  constructor(write) {
    this._write = write;
    this._batch = { frames: [] };
    this._bytes = 0;
    this._full = [];
    this._scheduled = false;
    this._writing = false;
    this._closed = false;
    this._idle = [];
    this.pendingBytes = 0;
    this.batchesSent = 0;
    // hold(): the open batch is not cut, so frames made until release() reach
    // the peer in one Batch (applied whole or not at all); _swaps counts open
    // batches taken for writing, to catch an await inside a hold.
    this._held = 0;
    this._swaps = 0;
  }

  /** Payload bytes in the batch being filled. */
  get openBytes() {
    return this._bytes;
  }

  get held() {
    return this._held > 0;
  }

  /** Keep every frame made until release(token) in one Batch (no await in between). */
  hold() {
    this._held += 1;
    return this._swaps;
  }

  release(token) {
    this._held -= 1;
    if (this._swaps !== token) {
      throw new Error(
        'frames held for one Batch were sent in several: an await between hold() and release()',
      );
    }
  }

  /** The open batch (to set its hello before the first write). */
  get current() {
    return this._batch;
  }

  frame() {
    if (this._batch.frames.length >= MAX_BATCH_FRAMES && !this._held) this._cut();
    const f = {};
    this._batch.frames.push(f);
    return f;
  }

  addPayload(size) {
    this.pendingBytes += size;
    this._bytes += size;
    if (this._bytes >= MAX_BATCH_BYTES && !this._held) this._cut();
  }

  _cut() {
    this._full.push([this._batch, this._bytes]);
    this._batch = { frames: [] };
    this._bytes = 0;
  }

  kick() {
    if (this._scheduled || this._writing || this._closed) return;
    this._scheduled = true;
    // After the current turn: everything the handlers produce in this turn
    // rides in the same Batch.
    setImmediate(() => {
      this._scheduled = false;
      this._run().catch(() => {});
    });
  }

  async _run() {
    if (this._writing) return;
    this._writing = true;
    try {
      while (this._full.length || this._batch.frames.length || this._batch.hello) {
        let batch;
        let size;
        if (this._full.length) {
          [batch, size] = this._full.shift();
        } else {
          batch = this._batch;
          size = this._bytes;
          this._swaps += 1;
          this._batch = { frames: [] };
          this._bytes = 0;
        }
        await this._write(batch);
        this.pendingBytes -= size;
        this.batchesSent += 1;
      }
    } finally {
      this._writing = false;
      for (const resolve of this._idle.splice(0)) resolve();
    }
  }

  /** Resolves once everything queued so far has been written (or failed). */
  async flush() {
    if (!this._writing && !this._scheduled && !this._full.length && !this._batch.frames.length) {
      return;
    }
    this.kick();
    await new Promise((resolve) => this._idle.push(resolve));
    if (this._full.length || this._batch.frames.length) await this.flush();
  }

  close() {
    this._closed = true;
  }
}
