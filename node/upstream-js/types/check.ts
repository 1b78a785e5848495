// Compiled by `npm run types` (tsc --noEmit): the declarations describe what
// an application writes, as README shows it.
import {
  type Conn,
  type Handler,
  MarkGone,
  PushRefused,
  UpstreamServer,
  nodeOf,
} from '@pmlb/upstream';

const handler: Handler = {
  onOpen(conn: Conn) {
    conn.send(`welcome ${conn.mark} (resumed: ${conn.resumed}, ${conn.metadata.room ?? '-'})`);
  },
  async onMessage(conn, data) {
    const done = conn.defer();
    conn.setMeta({ room: data.toString() });
    conn.send(Buffer.concat([Buffer.from(`${conn.mark} `), data]));
    await conn.accepted();
    done();
  },
  onClose(_conn, reason) {
    console.log(reason.length);
  },
  onMark(mark, info) {
    console.log(mark, info?.nodeId ?? 'gone');
  },
};

const server = new UpstreamServer(handler, { upstreamId: 'ts1', watchMarks: true });
const port: number = await server.start();
server.setServing(true);
server.atomic(() => {
  server.push('n1.aaaaaaaaaaaaa.1', 'hello').catch((err: unknown) => {
    if (err instanceof PushRefused) console.log(err.reason);
    else if (err instanceof MarkGone) console.log('gone');
  });
});
console.log(port, nodeOf('n1.aaaaaaaaaaaaa.1'), server.stats.refusedStreams, server.marks.size);
await server.stop(500);
