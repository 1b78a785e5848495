"""Turn on etcd authentication for the compose cluster, once.

Whoever can write etcd controls the cluster (README, "Security"): it adds
upstreams that receive client traffic and the upstream token, and registers
nodes. So the compose cluster runs etcd with users and roles, set up here by
the ``etcd-auth`` service (the pmlb image: its Python and etcd client) before
anything else writes:

* ``root``: etcd requires it before authentication is enabled; for operators.
* ``pmlb``: read and write under the pmlb prefix and the DNS prefix (nodes,
  ``pmlb upstream``, ``pmlb dashboard``, ``dns-sync``).
* ``coredns``: read the DNS prefix only.

Passwords: ETCD_ROOT_PASSWORD, PMLB_ETCD_PASSWORD, COREDNS_ETCD_PASSWORD.
Prefixes: PMLB_ETCD_PREFIX (default /pmlb), PMLB_DNS_PREFIX (default /skydns).
Run again, it changes nothing (authentication already on: it exits 0).

    python etcd_auth.py http://etcd1:2379,http://etcd2:2379
"""

from __future__ import annotations

import os
import sys
import time

import grpc
from etcd3aio.proto.etcd.api.authpb import auth_pb2
from etcd3aio.proto.etcd.api.etcdserverpb import rpc_pb2 as rpc
from etcd3aio.proto.etcd.api.etcdserverpb import rpc_pb2_grpc as rpc_grpc

WAIT = 60.0  # for etcd to come up


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _ignore_existing(call: object, *args: object) -> None:
    try:
        call(*args)  # type: ignore[operator]
    except grpc.RpcError as exc:
        if "already exists" not in (exc.details() or ""):  # type: ignore[attr-defined]
            raise


def main(endpoints: str) -> int:
    target = endpoints.split(",", maxsplit=1)[0].removeprefix("http://")
    env = os.environ
    pmlb_prefix = env.get("PMLB_ETCD_PREFIX", "/pmlb").rstrip("/") + "/"
    dns_prefix = env.get("PMLB_DNS_PREFIX", "/skydns").rstrip("/") + "/"
    passwords = {
        "root": env["ETCD_ROOT_PASSWORD"],
        "pmlb": env["PMLB_ETCD_PASSWORD"],
        "coredns": env["COREDNS_ETCD_PASSWORD"],
    }
    with grpc.insecure_channel(target) as channel:
        auth = rpc_grpc.AuthStub(channel)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                enabled = auth.AuthStatus(rpc.AuthStatusRequest(), timeout=5).enabled
                break
            except grpc.RpcError as exc:
                if "user name is empty" in (exc.details() or ""):  # type: ignore[attr-defined]
                    enabled = True  # only an authenticated caller may ask: it is on
                    break
                if time.monotonic() > deadline:
                    print(f"etcd at {target} did not answer: {exc}", file=sys.stderr)
                    return 1
                time.sleep(1)
        if enabled:
            print("etcd authentication is already on; nothing to do")
            return 0
        for user, password in passwords.items():
            _ignore_existing(auth.UserAdd, rpc.AuthUserAddRequest(name=user, password=password))
        grants = {
            "pmlb": [(pmlb_prefix, auth_pb2.Permission.READWRITE),
                     (dns_prefix, auth_pb2.Permission.READWRITE)],
            "coredns": [(dns_prefix, auth_pb2.Permission.READ)],
        }  # fmt: skip
        for role, perms in grants.items():
            _ignore_existing(auth.RoleAdd, rpc.AuthRoleAddRequest(name=role))
            for prefix, kind in perms:
                key = prefix.encode()
                auth.RoleGrantPermission(
                    rpc.AuthRoleGrantPermissionRequest(
                        name=role,
                        perm=auth_pb2.Permission(
                            permType=kind, key=key, range_end=_prefix_end(key)
                        ),
                    )
                )
            auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=role, role=role))
        _ignore_existing(auth.RoleAdd, rpc.AuthRoleAddRequest(name="root"))
        auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        auth.AuthEnable(rpc.AuthEnableRequest())
    print(f"etcd authentication on: pmlb rw {pmlb_prefix} {dns_prefix}, coredns r {dns_prefix}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
