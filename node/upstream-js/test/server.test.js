// UpstreamServer on a real grpc-js server, spoken to by a real gRPC client.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';

import * as grpc from '@grpc/grpc-js';
import { service as healthService } from 'grpc-health-check';

import { BRIDGE_SERVICE, HEALTH_SERVICE, UpstreamServer, isLoopback } from '../src/server.js';
import { Session } from '../src/session.js';

const Bridge = grpc.makeGenericClientConstructor(BRIDGE_SERVICE);
const Health = grpc.makeGenericClientConstructor(healthService);
const quiet = { info() {}, warn() {}, error() {} };

/** Open a Bridge stream; resolves the batches and the status as they come. */
function bridge(port, metadata = new grpc.Metadata()) {
  const client = new Bridge(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  const call = client.Bridge(metadata);
  const batches = [];
  const waiters = [];
  let status = null;
  const wake = () => waiters.splice(0).forEach((w) => w());
  call.on('data', (b) => {
    batches.push(b);
    wake();
  });
  call.on('status', (s) => {
    status = s;
    wake();
  });
  call.on('error', () => {});
  const until = async (cond, ms = 5000) => {
    const deadline = Date.now() + ms;
    while (!cond()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('timed out');
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  };
  return { call, client, batches, until, status: () => status };
}

describe('UpstreamServer', () => {
  let server;
  let guarded;
  before(async () => {
    server = new UpstreamServer(
      { onMessage: (conn, d) => conn.send(d) },
      { upstreamId: 'js-test', logger: quiet },
    );
    await server.start();
    guarded = new UpstreamServer({}, { upstreamId: 'guarded', token: 's3cret', logger: quiet });
    await guarded.start();
  });
  after(async () => {
    await server.stop(100);
    await guarded.stop(100);
  });

  it('answers Hello with its own, then echoes', async () => {
    const b = bridge(server.port);
    b.call.write({ hello: { id: 'n1', protocol: 2, initialWindow: 1000 } });
    await b.until(() => b.batches.length >= 1);
    const hello = b.batches[0].hello;
    assert.equal(hello.id, 'js-test');
    assert.equal(hello.protocol, 2);
    b.call.write({
      frames: [
        { mark: 'n1.aaaaaaaaaaaaa.1', open: { nextSeq: 1 } },
        { mark: 'n1.aaaaaaaaaaaaa.1', data: { seq: 1, payload: Buffer.from('hi') } },
      ],
    });
    await b.until(() => b.batches.some((x) => x.frames.some((f) => f.data)));
    const reply = b.batches.flatMap((x) => x.frames).find((f) => f.data);
    assert.equal(reply.data.payload.toString(), 'hi');
    assert.equal(reply.data.acked, 1);
    b.call.end();
    await b.until(() => b.status() !== null);
    assert.equal(b.status().code, grpc.status.OK);
    b.client.close();
  });

  it('ends a stream that does not start with Hello with INVALID_ARGUMENT', async () => {
    const b = bridge(server.port);
    b.call.write({ frames: [{ mark: 'x', data: { seq: 1, payload: Buffer.from('?') } }] });
    await b.until(() => b.status() !== null);
    assert.equal(b.status().code, grpc.status.INVALID_ARGUMENT);
    b.client.close();
  });

  it('refuses a node without the token', async () => {
    const b = bridge(guarded.port);
    b.call.write({ hello: { id: 'n1', protocol: 2 } });
    await b.until(() => b.status() !== null);
    assert.equal(b.status().code, grpc.status.UNAUTHENTICATED);
    assert.equal(guarded.stats.unauthenticated, 1);
    const md = new grpc.Metadata();
    md.set('authorization', 'Bearer s3cret');
    const ok = bridge(guarded.port, md);
    ok.call.write({ hello: { id: 'n1', protocol: 2 } });
    await ok.until(() => ok.batches.length >= 1);
    ok.call.end();
    b.client.close();
    ok.client.close();
  });

  it('ends only the stream a bug of its own hit, and keeps serving', async (t) => {
    const real = Session.prototype.process;
    let calls = 0;
    t.mock.method(Session.prototype, 'process', function process(batch) {
      calls += 1;
      if (calls === 2) throw new Error('a bug in the SDK');
      return real.call(this, batch);
    });
    const b = bridge(server.port);
    b.call.write({ hello: { id: 'n1', protocol: 2 } });
    await b.until(() => b.batches.length >= 1);
    b.call.write({ frames: [{ mark: 'n1.aaaaaaaaaaaaa.2', open: { nextSeq: 1 } }] });
    await b.until(() => b.status() !== null);
    assert.equal(b.status().code, grpc.status.INTERNAL);
    const again = bridge(server.port);
    again.call.write({ hello: { id: 'n1', protocol: 2 } });
    await again.until(() => again.batches.length >= 1);
    assert.equal(again.batches[0].hello.id, 'js-test');
    again.call.end();
    b.client.close();
    again.client.close();
  });

  it('serves grpc.health.v1 for the checker, and flips it', async () => {
    const client = new Health(`127.0.0.1:${server.port}`, grpc.credentials.createInsecure());
    const check = (service) =>
      new Promise((resolve, reject) =>
        client.Check({ service }, (err, res) => (err ? reject(err) : resolve(res.status))),
      );
    assert.equal(await check(HEALTH_SERVICE), 'SERVING');
    server.setServing(false);
    assert.equal(await check(HEALTH_SERVICE), 'NOT_SERVING');
    assert.equal(await check(''), 'NOT_SERVING');
    server.setServing(true);
    assert.equal(await check(HEALTH_SERVICE), 'SERVING');
    client.close();
  });
});

describe('anonymous Bridge beyond loopback', () => {
  it('knows loopback addresses', () => {
    for (const h of ['127.0.0.1', '127.9.8.7', '::1', '[::1]', 'localhost', '::ffff:127.0.0.1']) {
      assert.equal(isLoopback(h), true, h);
    }
    for (const h of ['0.0.0.0', '::', '[::]', '10.0.0.1', 'lb.example', '128.0.0.1']) {
      assert.equal(isLoopback(h), false, h);
    }
  });

  it('refuses to start beyond loopback with no token, unless allowed', async () => {
    const anon = new UpstreamServer({}, { upstreamId: 'u', listen: '0.0.0.0:0', token: '' });
    await assert.rejects(anon.start(), /not a loopback address/);
    const tokened = new UpstreamServer({}, { upstreamId: 'u', listen: '0.0.0.0:0', token: 't' });
    assert.doesNotThrow(() => tokened._checkAnonymous());
    const allowed = new UpstreamServer(
      {},
      { upstreamId: 'u', listen: '0.0.0.0:0', token: '', allowAnonymous: true },
    );
    assert.doesNotThrow(() => allowed._checkAnonymous());
  });
});
