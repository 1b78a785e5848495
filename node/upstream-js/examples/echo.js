#!/usr/bin/env node
// The example upstream, in Node.js: replies to each message with
// `<mark> <id> <message>` (like `pmlb echo-upstream`), so a client sees which
// mark it has and which upstream served it; `chat` broadcasts to every mark
// this upstream holds. With --conformance it runs the conformance handler
// that `pmlb conformance` drives instead.
//
//   node examples/echo.js --listen 127.0.0.1:4771 --id js1 [--conformance]
import { parseArgs } from 'node:util';

import { UpstreamServer } from '../src/index.js';
import { ConformanceHandler } from '../src/conformance.js';

class Echo {
  constructor(id) {
    this.id = id;
    this.conns = new Set();
  }

  onOpen(conn) {
    this.conns.add(conn);
  }

  onMessage(conn, data) {
    const text = data.toString('utf8');
    if (text.startsWith('chat ')) {
      const line = Buffer.from(`${conn.mark} says ${text.slice(5)}`);
      for (const other of this.conns) other.send(line);
      return;
    }
    conn.send(Buffer.concat([Buffer.from(`${conn.mark} ${this.id} `), data]));
  }

  onClose(conn) {
    this.conns.delete(conn);
  }
}

function main() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        listen: { type: 'string', default: '127.0.0.1:4771' },
        id: { type: 'string', default: 'js1' },
        conformance: { type: 'boolean', default: false },
        'allow-anonymous': { type: 'boolean', default: false },
        window: { type: 'string', default: '262144' },
        help: { type: 'boolean', short: 'h', default: false },
      },
    }));
  } catch (err) {
    console.error(`echo.js: error: ${err.message} (see --help)`);
    process.exit(2);
  }
  const window = Number(values.window);
  if (!Number.isInteger(window) || window <= 0) {
    console.error(
      `echo.js: error: --window must be a positive number of bytes, not ${values.window}`,
    );
    process.exit(2);
  }
  if (values.help) {
    console.log(
      'usage: node examples/echo.js [--listen HOST:PORT] [--id ID] [--conformance] [--window BYTES]\n' +
        '                             [--allow-anonymous]\n\n' +
        'The example pmlb upstream in Node.js: replies `<mark> <id> <message>`; "chat TEXT"\n' +
        'goes to every mark here. --conformance: the handler `pmlb conformance` drives.\n' +
        'PMLB_UPSTREAM_TOKEN: refuse nodes without this token. Without it, a --listen beyond\n' +
        'loopback is refused unless --allow-anonymous (any peer could act as a node).',
    );
    return;
  }
  const handler = values.conformance ? new ConformanceHandler() : new Echo(values.id);
  const server = new UpstreamServer(handler, {
    upstreamId: values.id,
    listen: values.listen,
    window,
    allowAnonymous: values['allow-anonymous'],
  });
  if (handler instanceof ConformanceHandler) handler.server = server;
  server.start().catch((err) => {
    console.error(`cannot serve on ${values.listen}: ${err.message}`);
    process.exit(1);
  });
  let stopping = false;
  const stop = () => {
    if (stopping) process.exit(1); // a second signal: now
    stopping = true;
    server.stop(1000).then(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main();
