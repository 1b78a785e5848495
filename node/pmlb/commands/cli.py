"""The ``pmlb`` command line.

Exit status: 0 on success, 2 for bad flags or config (one line on stderr),
1 for a runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from pmlb import DISTRIBUTION, __version__
from pmlb.config import (
    DNS_SYNC_OPTIONS,
    ECHO_OPTIONS,
    NODE_OPTIONS,
    add_options,
    node_config,
    resolve,
)
from pmlb.errors import ConfigError, PmlbError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line, not a usage dump.
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pmlb", description="pmlb, the persistent marking load balancer")
    parser.add_argument("--version", action="version", version=f"pmlb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    node = sub.add_parser(
        "node",
        help="run a load-balancer node",
        epilog="Signals: SIGHUP reloads what can change live; SIGTERM drains and exits; "
        "SIGUSR2 hands over to a successor started from the same command line (a live "
        "handover, e.g. after an upgrade: plain-TCP clients keep their connection and "
        "mark; TLS ones are drained).",
    )
    add_options(node, NODE_OPTIONS)
    node.add_argument(
        "--check",
        action="store_true",
        help="validate flags, PMLB_* variables and the --config file; print every error; "
        "exit 0 (valid) or 2",
    )
    echo = sub.add_parser("echo-upstream", help="run the example echo upstream")
    add_options(echo, ECHO_OPTIONS)
    dns = sub.add_parser("dns-sync", help="keep a dnsmasq hosts file of the live nodes")
    add_options(dns, DNS_SYNC_OPTIONS)
    from pmlb.commands.admin import add_status_parser, add_upstream_parser
    from pmlb.commands.dashboard import add_dashboard_parser
    from pmlb.testing.conformance_kit import add_conformance_parser

    add_upstream_parser(sub)
    add_status_parser(sub)
    add_dashboard_parser(sub)
    add_conformance_parser(sub)
    conn = sub.add_parser(
        "connect", help="an interactive line client: type messages, see each reply"
    )
    conn.add_argument("target", metavar="HOST:PORT", help="a node's client listener")
    conn.add_argument("--framing", default="line", help="line, len16, len32 or raw (default line)")
    conn.add_argument(
        "--linger",
        type=float,
        default=5.0,
        help="seconds to wait for the node to close after the input ends (default 5)",
    )
    demo = sub.add_parser(
        "demo", help="run a local cluster: etcd, two echo upstreams and two nodes"
    )
    demo.add_argument("--port", type=int, default=9000, help="client port of the node")
    demo.add_argument(
        "--upstream-port", type=int, default=7001, help="port of the first echo upstream"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The command line as given: a --workers supervisor starts its workers with it.
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "node":
            return _node(args)
        if args.command == "echo-upstream":
            return _echo(args)
        if args.command == "upstream":
            from pmlb.commands.admin import run_upstream

            return run_upstream(args)
        if args.command == "dns-sync":
            return _dns_sync(args)
        if args.command == "dashboard":
            from pmlb.commands.dashboard import run_dashboard

            return run_dashboard(args)
        if args.command == "conformance":
            from pmlb.testing.conformance_kit import run_conformance

            return run_conformance(args)
        if args.command == "status":
            from pmlb.commands.admin import run_status

            return run_status(args)
        if args.command == "connect":
            from pmlb import aio
            from pmlb.commands.connect import connect

            return aio.run(lambda stop: connect(args.target, args.framing, args.linger, stop))
        if args.command == "demo":
            from pmlb.commands.demo import run_demo

            return run_demo(args.port, args.upstream_port)
    except ConfigError as exc:
        for problem in str(exc).splitlines() or [""]:  # node_config lists them all
            print(f"pmlb {args.command}: error: {problem}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        # The SDK installs without the node's server-side dependencies.
        print(
            f"pmlb {args.command}: needs the node's dependencies (missing {exc.name}): "
            f"pip install '{DISTRIBUTION}[node]'",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:
        # The reader stopped early (`pmlb conformance --list | head -1`): not
        # an error. Point stdout at /dev/null so the interpreter's final flush
        # does not raise again, and exit as a process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (PmlbError, OSError) as exc:
        print(f"pmlb {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2  # unreachable: argparse requires a known command


def _node(args: argparse.Namespace) -> int:
    if args.check:
        return _check_node(args)
    config = node_config(resolve(NODE_OPTIONS, args))
    from pmlb import aio
    from pmlb.node.app import NodeApp
    from pmlb.node.workers import Supervisor, WorkerRole, default_workers, supervisor_channel
    from pmlb.observability.logs import setup_logging

    role = WorkerRole.from_env()  # set by the supervisor of a node of several workers
    tag = f"node/{config.node_id}" + (f"/w{role.index}" if role is not None else "")
    setup_logging(config.log_level, config.log_format, tag)
    workers = config.workers or default_workers()
    if workers > 1:
        supervisor = Supervisor(config, args.raw_argv, workers)
        return aio.run(
            supervisor.run,
            on_hup=supervisor.reload,
            on_force=supervisor.force,
            on_usr2=supervisor.hand_over,
        )
    try:
        # SIGHUP re-reads the same flags, variables and --config file.
        app = NodeApp(
            config,
            reload_config=lambda: node_config(resolve(NODE_OPTIONS, args)),
            role=role,
            argv=args.raw_argv,
        )
        return aio.run(app.run, on_hup=app.reload, on_usr2=app.hand_over)
    except Exception as exc:
        if role is not None:  # the supervisor says why the node cannot start, in one line
            supervisor_channel(role).say(
                "error", error=str(exc) or repr(exc), config=isinstance(exc, ConfigError)
            )
        raise


def _check_node(args: argparse.Namespace) -> int:
    """``pmlb node --check``: every problem, one per line; 0 when there is none."""
    errors: list[str] = []
    values = resolve(NODE_OPTIONS, args, errors=errors)
    # Invalid values were replaced by their defaults: the rest is still checked.
    try:
        config = node_config(values)
    except ConfigError as exc:
        # An option already reported as invalid is not reported again as missing.
        flags = {e.split(":", 1)[0].split()[0] for e in errors}
        errors += [p for p in str(exc).splitlines() if p.split(":", 1)[0].split()[0] not in flags]
    if errors:
        for problem in errors:
            print(f"pmlb node: error: {problem}", file=sys.stderr)
        return 2
    source = (
        "etcd " + ",".join(config.etcd)
        if config.etcd
        else f"{len(config.upstreams)} static upstream(s)"
    )
    print(
        f"pmlb node: configuration OK (node {config.node_id}, service {config.service!r}, "
        f"{len(config.listen)} listener(s), {source})"
    )
    return 0


def _echo(args: argparse.Namespace) -> int:
    values = resolve(ECHO_OPTIONS, args)
    from pmlb import aio
    from pmlb.observability.logs import setup_logging
    from pmlb.upstream.echo import run_echo

    setup_logging(values["log_level"], values["log_format"], f"echo/{values['id']}")
    tls = None
    if values["tls_cert"] or values["tls_key"]:
        if not (values["tls_cert"] and values["tls_key"]):
            raise ConfigError("--tls-cert and --tls-key go together")
        from pmlb.transport import ServerTLS

        tls = ServerTLS(values["tls_cert"], values["tls_key"], values["tls_client_ca"])
    return aio.run(
        lambda stop: run_echo(
            values["listen"],
            values["id"],
            values["plain"],
            values["window"],
            stop,
            tls=tls,
            token=values["upstream_token"],
            transport=values["link_transport"],
            conformance=values["conformance"],
            allow_anonymous=values["allow_anonymous"],
        )
    )


def _dns_sync(args: argparse.Namespace) -> int:
    values = resolve(DNS_SYNC_OPTIONS, args)
    if not values["hosts_file"]:
        raise ConfigError("--hosts-file FILE is required")
    from pathlib import Path

    from pmlb import aio
    from pmlb.cluster.dns import HostsFileSync
    from pmlb.observability.logs import setup_logging
    from pmlb.store.etcd import EtcdStore, settings_from
    from pmlb.store.keys import Keys

    setup_logging(values["log_level"], values["log_format"], "dns-sync")

    async def run(stop: asyncio.Event) -> int:
        store = EtcdStore(settings_from(values))
        await store.connect()
        sync = HostsFileSync(
            store,
            Keys(values["etcd_prefix"]),
            Path(values["hosts_file"]),
            values["name"],
            values["service"],
            values["dnsmasq_pid"],
            Path(values["dnsmasq_pidfile"]) if values["dnsmasq_pidfile"] else None,
        )
        task = asyncio.get_running_loop().create_task(aio.supervised("dns-sync", sync.run))
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
        return 0

    return aio.run(run)


if __name__ == "__main__":
    sys.exit(main())
