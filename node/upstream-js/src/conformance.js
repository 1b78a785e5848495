// The conformance handler: what an upstream runs while `pmlb conformance`
// checks it. Every message is echoed unchanged, except these commands
// (proto/README.md, "The conformance kit"; the Python SDK's twin is
// pmlb.upstream.conformance):
//
//   !noreply ...            nothing (the message is acknowledged, no reply)
//   !info                   a JSON object of what the handler sees
//   !meta KEY=VALUE         set metadata on the mark
//   !unmeta KEY             remove a metadata key
//   !close REASON [DETAIL]  close the mark with that reason
//   !push MARK TEXT         send TEXT to another mark of the same node
//   !flood N SIZE           send N messages of SIZE bytes (6-digit index, '.')
//   !sleep MS               wait MS milliseconds, then reply "slept"
//   !raise                  the handler throws

export function floodMessage(index, size) {
  const head = String(index).padStart(6, '0').slice(0, size);
  return Buffer.from(head + '.'.repeat(Math.max(0, size - head.length)));
}

export function info(conn) {
  const fields = {
    accepted_at_unix_ms: conn.acceptedAtUnixMs,
    client_addr: conn.clientAddr,
    client_port: conn.clientPort,
    framing: conn.framing,
    mark: conn.mark,
    metadata: conn.metadata,
    node_id: conn.nodeId,
    resumed: conn.resumed,
    seq: conn.seq,
    service: conn.service,
    trace_context: conn.traceContext,
  };
  return Buffer.from(JSON.stringify(fields));
}

export class ConformanceHandler {
  /** @param {import('./server.js').UpstreamServer} [server] needed by !push; set later is fine */
  constructor(server) {
    this.server = server;
  }

  onMessage(conn, data) {
    if (data[0] !== 0x21 /* ! */) {
      conn.send(data);
      return undefined;
    }
    const [command, ...args] = data.toString('utf8').split(' ');
    switch (command) {
      case '!noreply':
        return undefined;
      case '!info':
        conn.send(info(conn));
        return undefined;
      case '!meta': {
        const text = args.join(' ');
        const at = text.indexOf('=');
        conn.setMeta(at < 0 ? { [text]: '' } : { [text.slice(0, at)]: text.slice(at + 1) });
        return undefined;
      }
      case '!unmeta':
        conn.unsetMeta(...args);
        return undefined;
      case '!close':
        conn.close(args[0] ?? '', args.slice(1).join(' '));
        return undefined;
      case '!push':
        this.server.push(args[0], Buffer.from(args.slice(1).join(' ')));
        return undefined;
      case '!flood': {
        const [count, size] = args.map(Number);
        for (let i = 0; i < count; i += 1) conn.send(floodMessage(i, size));
        return undefined;
      }
      case '!sleep':
        return new Promise((resolve) => setTimeout(resolve, Number(args[0]))).then(() =>
          conn.send('slept'),
        );
      case '!raise':
        throw new Error('!raise asked for it');
      default:
        conn.send(`unknown command ${command}`);
        return undefined;
    }
  }
}
