// npm pack / npm publish: put the Bridge contract in the package, where
// src/proto.js looks first (proto/pmlb/v1/upstream.proto beside src/). In the
// repository the SDK reads ../../proto directly; an installed package has
// no repository around it.
import { copyFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const sdk = join(dirname(fileURLToPath(import.meta.url)), '..');
const from = join(sdk, '..', '..', 'proto', 'pmlb', 'v1', 'upstream.proto');
const to = join(sdk, 'proto', 'pmlb', 'v1', 'upstream.proto');
mkdirSync(dirname(to), { recursive: true });
copyFileSync(from, to);
console.log(`copied ${from} -> ${to}`);
