// The Bridge messages (proto/pmlb/v1/upstream.proto), encoded and decoded
// with protobufjs straight from the contract file, so the SDK cannot drift
// from it. uint64 fields (seq, acked, ping ids) decode as JavaScript numbers:
// exact up to 2^53, far beyond any mark's sequence.
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import protobuf from 'protobufjs';

protobuf.util.Long = undefined;
protobuf.configure();

const here = dirname(fileURLToPath(import.meta.url));

/** Where upstream.proto is: PMLB_PROTO, a copy packed with the SDK, or the repository's. */
export function protoPath() {
  const candidates = [
    process.env.PMLB_PROTO,
    join(here, '..', 'proto', 'pmlb', 'v1', 'upstream.proto'),
    join(here, '..', '..', '..', 'proto', 'pmlb', 'v1', 'upstream.proto'),
  ].filter(Boolean);
  const found = candidates.find((p) => existsSync(p));
  if (!found) {
    throw new Error(
      `upstream.proto not found (looked in ${candidates.join(', ')}); set PMLB_PROTO`,
    );
  }
  return found;
}

const root = protobuf.loadSync(protoPath());
export const Batch = root.lookupType('pmlb.v1.Batch');

/** What a received message that is not a Batch decodes to. */
export const GARBAGE = Object.freeze({ garbage: true });

export const BRIDGE_PATH = '/pmlb.v1.Upstream/Bridge';

/**
 * Decode a received Batch, never throwing: grpc-js ends the whole stream when
 * a deserializer throws, and one unparseable message must not take every mark
 * on the link with it (the reader counts and drops GARBAGE).
 */
export function decodeBatch(buffer) {
  try {
    return Batch.decode(buffer);
  } catch {
    return GARBAGE;
  }
}

/** Encode a Batch given as a plain object ({hello, frames: [...]}) */
export function encodeBatch(batch) {
  return Buffer.from(Batch.encode(batch).finish());
}
