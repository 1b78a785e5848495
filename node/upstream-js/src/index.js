// @pmlb/upstream: write a pmlb upstream in Node.js.
//
//   import { UpstreamServer } from '@pmlb/upstream';
//   const server = new UpstreamServer({
//     onOpen(conn) { conn.send('welcome'); },
//     onMessage(conn, data) { conn.send(Buffer.concat([Buffer.from(`${conn.mark} `), data])); },
//     onClose(conn, reason) {},
//   }, { upstreamId: 'js1', listen: '127.0.0.1:7001' });
//   await server.start();
//
// The contract it implements is proto/README.md; `pmlb conformance HOST:PORT`
// checks it (run examples/echo.js --conformance).
export { UpstreamServer, HEALTH_SERVICE, GRPC_MAX_MESSAGE, VERSION } from './server.js';
export { Conn, Session, nodeOf, PROTOCOL_VERSION, DEFAULT_WINDOW } from './session.js';
export {
  PmlbError,
  BackpressureError,
  MarkGone,
  FrameTooLarge,
  MetadataTooLarge,
  PushRefused,
} from './errors.js';
export { BatchWriter, FRAME_OVERHEAD, MAX_ATOMIC_BYTES } from './writer.js';
export { WatchedMarks } from './tracking.js';
