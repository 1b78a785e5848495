#!/usr/bin/env node
// Chat rooms across upstreams, in Node.js: the twin of the Python SDK's
// node/examples/rooms_server.py (the same lines in, the same lines out), to
// show the SDK calls a real server needs. Run the node with --framing line
// and --push-upstreams naming these upstreams.
//
//   join ROOM     -> "joined ROOM"       (room kept in the mark's metadata)
//   say TEXT      -> every other member of the room, on any upstream, gets
//                    "<mark> says TEXT"; the sender then gets "said N", N the
//                    members the node accepted it for
//   who           -> "members M1 M2 ..." (the room's marks, sorted)
//   push MARK TEXT -> MARK gets TEXT; the sender gets "accepted", "gone" or
//                    "refused REASON"
//   kick MARK     -> MARK's client is closed (reason "kicked"); the sender
//                    gets "kicked"
//
//   node examples/rooms.js --listen 127.0.0.1:4772 --id js1
import { parseArgs } from 'node:util';

import { MarkGone, PushRefused, UpstreamServer } from '../src/index.js';

class Rooms {
  constructor() {
    this.server = null;
  }

  members(room) {
    return [...this.server.marks.values()]
      .filter((info) => info.metadata.room === room)
      .map((info) => info.mark)
      .sort();
  }

  async onMessage(conn, data) {
    const text = data.toString('utf8');
    const space = text.indexOf(' ');
    const cmd = space < 0 ? text : text.slice(0, space);
    const arg = space < 0 ? '' : text.slice(space + 1);
    if (cmd === 'join') {
      conn.setMeta({ room: arg });
      await conn.accepted(); // every upstream has been told before the answer
      conn.send(`joined ${arg}`);
    } else if (cmd === 'say') {
      const line = `${conn.mark} says ${arg}`;
      const others = this.members(conn.metadata.room ?? '').filter((m) => m !== conn.mark);
      const results = await Promise.allSettled(others.map((m) => this.server.push(m, line)));
      conn.send(`said ${results.filter((r) => r.status === 'fulfilled').length}`);
    } else if (cmd === 'who') {
      conn.send(`members ${this.members(conn.metadata.room ?? '').join(' ')}`);
    } else if (cmd === 'push') {
      const at = arg.indexOf(' ');
      try {
        await this.server.push(arg.slice(0, at), arg.slice(at + 1));
        conn.send('accepted');
      } catch (err) {
        if (err instanceof MarkGone) conn.send('gone');
        else if (err instanceof PushRefused) conn.send(`refused ${err.reason}`);
        else throw err;
      }
    } else if (cmd === 'kick') {
      this.server.closeMark(arg, 'kicked');
      conn.send('kicked');
    } else {
      conn.send(`unknown command ${cmd}`);
    }
  }
}

async function main() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        listen: { type: 'string', default: '127.0.0.1:4772' },
        id: { type: 'string', default: 'js1' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }));
  } catch (err) {
    console.error(`rooms.js: error: ${err.message} (see --help)`);
    process.exit(2);
  }
  if (values.help) {
    console.log('usage: node examples/rooms.js [--listen HOST:PORT] [--id ID]');
    return;
  }
  const rooms = new Rooms();
  const server = new UpstreamServer(rooms, {
    upstreamId: values.id,
    listen: values.listen,
    watchMarks: true,
  });
  rooms.server = server;
  await server.start();
  for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => server.stop().then(() => process.exit(0)));
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
