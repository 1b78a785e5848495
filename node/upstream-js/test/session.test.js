// The Bridge protocol core (src/session.js) against a fake writer: no gRPC.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { floodMessage } from '../src/conformance.js';
import { BackpressureError, FrameTooLarge, MetadataTooLarge } from '../src/errors.js';
import { Session, nodeOf } from '../src/session.js';

class FakeWriter {
  constructor() {
    this.frames = [];
  }

  frame() {
    const f = {};
    this.frames.push(f);
    return f;
  }

  addPayload() {}

  kick() {}

  take(kind) {
    const out = this.frames.filter((f) => kind in f);
    this.frames = this.frames.filter((f) => !(kind in f));
    return out;
  }
}

function session(handler, { window = 262144, peerWindow = 262144, maxQueue = 4 << 20 } = {}) {
  const writer = new FakeWriter();
  const errors = [];
  const stats = {
    framesForUnknownMarks: 0,
    duplicatesSkipped: 0,
    unexpectedFrames: 0,
    handlerErrors: 0,
  };
  const s = new Session({
    handler,
    writer,
    hello: { id: 'n1', protocol: 2, initialWindow: peerWindow },
    window,
    maxQueue,
    concurrency: 64,
    stats,
    log: (msg) => errors.push(msg),
  });
  return { s, writer, stats, errors };
}

const open = (mark, extra = {}) => ({
  mark,
  kind: 'open',
  open: { nextSeq: 1, metadata: {}, traceContext: {}, ...extra },
});
const data = (mark, seq, text) => ({
  mark,
  kind: 'data',
  data: { seq, payload: Buffer.from(text) },
});
const flow = (mark, credit) => ({ mark, kind: 'flow', flow: { credit, acked: 0 } });
const close = (mark, reason) => ({ mark, kind: 'close', close: { reason } });
const echo = { onMessage: (conn, d) => conn.send(d) };
const tick = () => new Promise((resolve) => setImmediate(resolve));

describe('session', () => {
  it('echoes with the acknowledgement riding on the reply', () => {
    const { s, writer } = session(echo);
    s.process({ frames: [open('n1.x.m'), data('n1.x.m', 1, 'a'), data('n1.x.m', 2, 'b')] });
    const replies = writer.take('data');
    assert.deepEqual(
      replies.map((f) => [f.mark, f.data.payload.toString(), f.data.acked]),
      [
        ['n1.x.m', 'a', 1],
        ['n1.x.m', 'b', 2],
      ],
    );
  });

  it('acknowledges a message without a reply with a flow frame', () => {
    const { s, writer } = session({ onMessage() {} });
    s.process({ frames: [open('n1.x.m'), data('n1.x.m', 1, 'quiet')] });
    assert.deepEqual(
      writer.take('flow').map((f) => f.flow.acked),
      [1],
    );
    assert.equal(writer.take('data').length, 0);
  });

  it('sends only while the node granted credit, then queues in order', () => {
    // 3 messages of 100 bytes cost 164 each; a window of 200 lets 2 go
    // (a frame goes while any credit is left).
    const { s, writer } = session(
      { onMessage: (conn) => ['1', '2', '3'].forEach((n) => conn.send(n.repeat(100))) },
      { peerWindow: 200 },
    );
    s.process({ frames: [open('n1.x.m'), data('n1.x.m', 1, 'go')] });
    assert.equal(writer.take('data').length, 2);
    s.process({ frames: [flow('n1.x.m', 1000)] });
    const rest = writer.take('data');
    assert.equal(rest.length, 1);
    assert.equal(rest[0].data.payload.toString()[0], '3');
  });

  it("refuses a reply over the node's maxFrame and metadata over its maxMeta", () => {
    const thrown = [];
    const { s, writer } = session({
      onMessage(conn, d) {
        for (const attempt of [
          () => conn.send(Buffer.alloc(11)),
          () => conn.setMeta({ key: 'toolong' }), // 3 + 7 > 8
        ]) {
          try {
            attempt();
          } catch (err) {
            thrown.push(err);
          }
        }
        conn.setMeta({ k: 'v' });
        conn.send(d);
      },
    });
    s.process({ frames: [open('n1.x.m', { maxFrame: 10, maxMeta: 8 }), data('n1.x.m', 1, 'ok')] });
    assert.ok(thrown[0] instanceof FrameTooLarge, String(thrown[0]));
    assert.match(thrown[0].message, /11 bytes exceeds the limit of 10/);
    assert.ok(thrown[1] instanceof MetadataTooLarge, String(thrown[1]));
    const conn = s.conns.get('n1.x.m');
    assert.deepEqual([conn.maxFrame, conn.maxMeta], [10, 8]);
    assert.deepEqual(conn.metadata, { k: 'v' }, 'a refused change changes nothing');
    assert.deepEqual(
      writer.take('data').map((f) => f.data.payload.toString()),
      ['ok'],
    );
    assert.deepEqual(
      writer.take('meta').map((f) => f.meta.set),
      [{ k: 'v' }],
    );
  });

  it('defer() holds the acknowledgement until done(), replies or not', () => {
    let done;
    const { s, writer } = session({
      onMessage(conn) {
        done = conn.defer();
        conn.send('held');
      },
    });
    s.process({ frames: [open('n1.x.m'), data('n1.x.m', 1, 'hold')] });
    const [reply] = writer.take('data');
    assert.equal(reply.data.payload.toString(), 'held');
    assert.ok(!reply.data.acked, 'the reply does not acknowledge a deferred message');
    assert.deepEqual(
      writer.take('flow').filter((f) => f.flow.acked),
      [],
    );
    done();
    assert.deepEqual(
      writer.take('flow').map((f) => f.flow.acked),
      [1],
    );
  });

  it("a send from another mark's handler does not acknowledge the target's message", async () => {
    let release;
    const gate = new Promise((resolve) => {
      release = resolve;
    });
    const { s, writer } = session({
      async onMessage(conn, d) {
        if (d.toString() === 'slow') {
          await gate;
          conn.send('slow done');
        } else {
          s.conns.get('n1.x.b').send('pushed');
          conn.send('pushed it');
        }
      },
    });
    s.process({
      frames: [
        open('n1.x.b'),
        data('n1.x.b', 1, 'slow'),
        open('n1.x.a'),
        data('n1.x.a', 1, 'push'),
      ],
    });
    await tick();
    const sent = writer.take('data').map((f) => [f.mark, f.data.payload.toString(), f.data.acked]);
    assert.deepEqual(sent, [
      ['n1.x.b', 'pushed', undefined],
      ['n1.x.a', 'pushed it', 1],
    ]);
    release();
    await tick();
    await tick();
    assert.deepEqual(
      writer.take('data').map((f) => [f.mark, f.data.payload.toString(), f.data.acked]),
      [['n1.x.b', 'slow done', 1]],
    );
  });

  it('throws BackpressureError when the queue bound is hit, and the mark stays', () => {
    let thrown;
    const { s, writer } = session(
      {
        onMessage(conn) {
          try {
            for (let i = 0; i < 100; i += 1) conn.send(Buffer.alloc(1000));
          } catch (err) {
            thrown = err;
          }
        },
      },
      { peerWindow: 1, maxQueue: 10_000 },
    );
    s.process({ frames: [open('n1.x.m'), data('n1.x.m', 1, 'x')] });
    assert.ok(thrown instanceof BackpressureError);
    assert.equal(s.conns.has('n1.x.m'), true);
    assert.equal(writer.take('close').length, 0);
  });

  it('skips a replayed seq it has handled, and returns its credit', () => {
    const seen = [];
    const { s, stats } = session({ onMessage: (conn, d) => seen.push([conn.seq, d.toString()]) });
    s.process({ frames: [open('n1.x.m', { nextSeq: 6, resumed: true }), data('n1.x.m', 6, 'a')] });
    s.process({ frames: [data('n1.x.m', 6, 'a'), data('n1.x.m', 7, 'b')] });
    assert.deepEqual(seen, [
      [6, 'a'],
      [7, 'b'],
    ]);
    assert.equal(stats.duplicatesSkipped, 1);
  });

  it('answers a ping at once while a handler is busy', async () => {
    let release;
    const busy = new Promise((resolve) => {
      release = resolve;
    });
    const { s, writer } = session({ onMessage: () => busy });
    s.process({ frames: [open('n1.x.m'), data('n1.x.m', 1, 'slow')] });
    s.process({ frames: [{ mark: '', kind: 'ping', ping: { id: 17, reply: false } }] });
    assert.deepEqual(
      writer.take('ping').map((f) => f.ping),
      [{ id: 17, reply: true }],
    );
    release();
    await tick();
  });

  it('keeps a mark in order across async handlers, and other marks unblocked', async () => {
    const order = [];
    const { s, writer } = session({
      async onMessage(conn, d) {
        if (d.toString() === 'slow') await new Promise((resolve) => setTimeout(resolve, 20));
        order.push(`${conn.mark}:${d}`);
        conn.send(d);
      },
    });
    s.process({
      frames: [
        open('n1.x.a'),
        open('n1.x.b'),
        data('n1.x.a', 1, 'slow'),
        data('n1.x.a', 2, 'next'),
        data('n1.x.b', 1, 'fast'),
      ],
    });
    for (let i = 0; i < 100 && order.length < 3; i += 1) await new Promise((r) => setTimeout(r, 5));
    assert.deepEqual(order, ['n1.x.b:fast', 'n1.x.a:slow', 'n1.x.a:next']);
    assert.equal(writer.take('data').length, 3);
  });

  it('closes only the mark whose handler threw, sync or async', async () => {
    const { s, writer, stats } = session({
      onMessage(conn, d) {
        if (d.toString() === 'boom') throw new Error('boom');
        if (d.toString() === 'later') return Promise.reject(new Error('later'));
        conn.send(d);
        return undefined;
      },
    });
    s.process({
      frames: [
        open('n1.x.a'),
        open('n1.x.b'),
        open('n1.x.c'),
        data('n1.x.a', 1, 'boom'),
        data('n1.x.c', 1, 'later'),
      ],
    });
    await tick();
    s.process({ frames: [data('n1.x.b', 1, 'fine')] });
    const closes = writer.take('close').map((f) => [f.mark, f.close.reason]);
    assert.deepEqual(closes.sort(), [
      ['n1.x.a', 'upstream_error'],
      ['n1.x.c', 'upstream_error'],
    ]);
    assert.deepEqual(
      writer.take('data').map((f) => f.data.payload.toString()),
      ['fine'],
    );
    assert.equal(stats.handlerErrors, 2);
  });

  it('answers a moved close after the mark pending replies', async () => {
    const { s, writer } = session({
      async onMessage(conn, d) {
        await tick();
        conn.send(d);
      },
    });
    s.process({
      frames: [
        open('n1.x.m'),
        data('n1.x.m', 1, 'one'),
        data('n1.x.m', 2, 'two'),
        close('n1.x.m', 'moved'),
      ],
    });
    for (let i = 0; i < 100 && !writer.frames.some((f) => f.close); i += 1) await tick();
    const kinds = writer.frames
      .filter((f) => f.data || f.close)
      .map((f) => (f.data ? f.data.payload.toString() : f.close.reason));
    assert.deepEqual(kinds, ['one', 'two', 'upstream_closed']);
  });

  it('ignores frames for marks it does not hold and kinds it does not know', () => {
    const { s, writer, stats } = session(echo);
    s.process({ frames: [data('ghost', 1, 'x'), { mark: 'm' }] });
    assert.equal(stats.framesForUnknownMarks, 1);
    assert.equal(stats.unexpectedFrames, 1);
    assert.equal(writer.frames.length, 0);
  });
});

describe('helpers', () => {
  it('finds the node of a mark, node ids with dots included', () => {
    assert.equal(nodeOf('n1.3rlmetyawxfgw.2'), 'n1');
    assert.equal(nodeOf('eu.n1.3rlmetyawxfgw.2a'), 'eu.n1');
    assert.throws(() => nodeOf('nope'));
  });

  it('numbers flood messages with a 6-digit index', () => {
    assert.equal(floodMessage(7, 10).toString(), '000007....');
    assert.equal(floodMessage(7, 3).toString(), '000');
    assert.equal(floodMessage(7, 0).length, 0);
  });
});

describe('marks of other nodes', () => {
  it('ignores and counts an Open for a mark of another node', () => {
    const { s, stats, errors } = session(echo);
    stats.foreignOpens = 0;
    s.process({ frames: [open('n2.x.1'), open('n1.x.2'), open('not-a-mark')] });
    assert.equal(stats.foreignOpens, 2);
    assert.deepEqual([...s.conns.keys()], ['n1.x.2']);
    assert.match(errors[0], /a mark of another node; ignored/);
  });
});
