"""``pmlb conformance HOST:PORT``: check an upstream against the Bridge contract.

The kit plays a node. It opens Bridge streams with the node's own transport
code (``pmlb.transport.open_client``), writes frames with the node's message
types and Hello, and reads the upstream's answers the way a link does, so the
kit and the node cannot drift apart. Each named case drives one part of the
contract (proto/README.md, one section per case) on fresh streams and says in
one line what a failing upstream did.

The upstream's application must be its *conformance handler*: it echoes every
message unchanged and obeys a few ``!`` commands (``!info``, ``!flood N SIZE``,
...; ``pmlb.upstream.conformance`` is the Python one, and proto/README.md lists
them). That is how the kit makes an upstream send, close, push, set metadata
and raise on demand.

What the kit checks on every stream, whatever the case, and fails the case on
at once: the first Batch carries the Hello and no later one does; the upstream
sends a mark's Data only while the credit the kit granted for it is positive
(each frame costs payload + 64 with protocol 2, so one frame may take the
credit below zero, as the node's own sending does); it never acknowledges a
seq the kit did not send.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from pmlb.testing.conformance_kit.cases import CASES, Case, Kit
from pmlb.testing.conformance_kit.peer import ANSWER_TIMEOUT, DOC, CaseFailed, Options, Peer
from pmlb.transport import (
    DEFAULT_TRANSPORT,
    TRANSPORTS,
    ClientTLS,
    TransportError,
    client_ssl_context,
)

__all__ = [
    "CASES",
    "Case",
    "CaseFailed",
    "Kit",
    "Options",
    "Peer",
    "Result",
    "add_conformance_parser",
    "report",
    "run_case",
    "run_cases",
    "run_conformance",
]

# -- running ------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    passed: bool
    line: str
    seconds: float


async def run_case(options: Options, index: int, c: Case) -> Result:
    kit = Kit(options, index)
    started = time.monotonic()
    try:
        async with asyncio.timeout(c.timeout):
            await c.run(kit)
        return Result(c, True, c.checks, time.monotonic() - started)
    except CaseFailed as exc:
        return Result(c, False, str(exc), time.monotonic() - started)
    except TimeoutError:
        return Result(c, False, f"the case did not finish within {c.timeout:.0f} s", c.timeout)
    except (TransportError, grpc.aio.AioRpcError, OSError) as exc:
        return Result(c, False, f"the connection failed: {exc}", time.monotonic() - started)
    finally:
        await kit.close()


async def run_cases(options: Options, names: list[str] | None = None) -> list[Result]:
    chosen = [c for c in CASES if not names or c.name in names]
    results = []
    for i, c in enumerate(chosen):
        results.append(await run_case(options, i, c))
    return results


def report(results: list[Result], out: Callable[[str], None]) -> None:
    width = max(len(r.case.name) for r in results)
    for r in results:
        status = "PASS" if r.passed else "FAIL"
        out(f"{status}  {r.case.name:<{width}}  {r.line}  [{r.seconds:.2f}s]")
        if not r.passed:
            out(f"      {'':<{width}}  see {DOC}#{r.case.section}")
    failed = sum(not r.passed for r in results)
    out(f"{len(results) - failed} passed, {failed} failed")


# -- command line -----------------------------------------------------------------


def add_conformance_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "conformance",
        help="check an upstream against the Bridge contract, case by case",
        description="Connect to an upstream as a node would and run every case of the "
        "Bridge contract against it. The upstream must run its conformance handler "
        "(pmlb echo-upstream --conformance; see proto/README.md). Exit 0 only if every "
        "case passes.",
    )
    p.add_argument("target", metavar="HOST:PORT", nargs="?", help="the upstream's gRPC address")
    p.add_argument(
        "--link-transport",
        choices=TRANSPORTS,
        default=DEFAULT_TRANSPORT,
        help=f"gRPC implementation the kit uses (default {DEFAULT_TRANSPORT}, the node's default)",
    )
    p.add_argument(
        "--case",
        action="append",
        dest="cases",
        metavar="NAME",
        help="run only this case (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--timeout",
        type=float,
        default=ANSWER_TIMEOUT,
        help=f"seconds an answer may take (default {ANSWER_TIMEOUT:g}, the node's --ack-timeout)",
    )
    p.add_argument("--upstream-token", help="present this token, as the node's --upstream-token")
    p.add_argument("--tls-ca", help="verify the upstream's TLS certificate with this CA (PEM)")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mTLS")
    p.add_argument("--tls-key", help="key (PEM) for --tls-cert")


def run_conformance(args: argparse.Namespace) -> int:
    from pmlb.errors import ConfigError

    if args.list:
        for c in CASES:
            print(f"{c.name:<20} {c.checks}  ({DOC}#{c.section})")
        return 0
    if not args.target:
        raise ConfigError("give the upstream's HOST:PORT")
    unknown = sorted(set(args.cases or ()) - {c.name for c in CASES})
    if unknown:
        raise ConfigError(f"unknown case {', '.join(unknown)}: see --list")
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key)
        client_ssl_context(tls)  # bad files: a clear error now
    if args.timeout <= 0:
        raise ConfigError("--timeout must be positive")
    options = Options(
        args.target, args.link_transport, tls, args.upstream_token, timeout=args.timeout
    )
    print(f"pmlb conformance {args.target} ({args.link_transport}, node id {options.node_id})")
    results = asyncio.run(run_cases(options, args.cases))
    report(results, print)
    sys.stdout.flush()
    return 0 if all(r.passed for r in results) else 1
