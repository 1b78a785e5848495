"""The composition root: builds a node's parts from its config, starts them in
order, and stops them in the reverse order.

Start: etcd view (bounded wait) -> links (they connect in the background) ->
admin and control API -> listeners -> etcd session (registration) and checker.
Clients are accepted only once everything else is bound: a node that cannot
start never takes a client it would then drop. As a worker of a node of
several (``role``, pmlb.node.workers), the node says "prepared" to its supervisor
before the listeners and waits for every sibling to be prepared too; its admin
and control endpoints are internal Unix sockets besides the node's shared
control address, and the supervisor registers the node.
Stop (the first SIGTERM/SIGINT, POST /drain, or the ``stop`` event in tests):
resign as checker and revoke the lease (leave etcd and DNS at once) -> stop
accepting -> serve open marks up to ``drain_timeout``, then close the rest over
``drain_window`` with ``node_draining`` -> flush links (bounded by
``shutdown_timeout``; anything still open then gets ``node_shutdown``) ->
control API -> tracing flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Callable, Sequence

import grpc

from pmlb import __version__
from pmlb.aio import Backoff
from pmlb.cluster.membership import EtcdMembership, Membership, StaticMembership
from pmlb.cluster.registration import node_entry
from pmlb.config import NodeConfig, config_changes
from pmlb.dataplane.control import start_control
from pmlb.dataplane.plane import DataPlane
from pmlb.dataplane.siblings import (
    NodeCounters,
    NodeProbation,
    Siblings,
    admin_socket,
    control_socket,
)
from pmlb.errors import ConfigError
from pmlb.node import sdnotify
from pmlb.node.handover import Giver, Taker, handover_socket, successor_argv, taker_channel
from pmlb.node.routes import add_node_routes
from pmlb.node.workers import SupervisorChannel, WorkerRole, supervisor_channel
from pmlb.observability import metrics
from pmlb.observability.admin import AdminServer
from pmlb.observability.stats import NodeStats
from pmlb.observability.tracing import ConnTracer
from pmlb.store.etcd import EtcdStore, node_settings
from pmlb.store.keys import now_rfc3339
from pmlb.tlsconf import grpc_server_credentials
from pmlb.transport import describe as describe_links

log = logging.getLogger("pmlb.app")


class NodeApp:
    def __init__(
        self,
        config: NodeConfig,
        reload_config: Callable[[], NodeConfig] | None = None,
        role: WorkerRole | None = None,
        argv: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.role = role
        # The command line a successor is started from (SIGUSR2), and the
        # channel to the predecessor when this process is one.
        self.argv = list(argv)
        self.taker_chan = taker_channel()
        self._giving: asyncio.Task[None] | None = None
        self.handed_over = False
        self._reload_config = reload_config
        self.reloads = 0
        self.stats = NodeStats()
        self.tracer = ConnTracer(config.node_id, config.service, config.otlp_endpoint)
        self.siblings: Siblings | None = None
        self.probation: NodeProbation | None = None
        self.counters: NodeCounters | None = None
        self.channel: SupervisorChannel | None = None
        if role is not None:
            self.siblings = Siblings(config.node_id, role.index, role.count, role.rundir)
            self.probation = NodeProbation(role.rundir)
            self.counters = NodeCounters(role.rundir, role.index, role.count)
            self.channel = supervisor_channel(role)
        self.plane = DataPlane(
            role.config(config) if role else config,
            self.stats,
            self.tracer,
            self.siblings,
            self.probation,
            self.counters,
        )
        self.admin: AdminServer | None = None
        self.internal_control: grpc.aio.Server | None = None
        if role is not None:
            self.admin = AdminServer("", 0, unix_path=admin_socket(role.rundir, role.index))
            self._routes(self.admin)
        elif config.admin is not None:
            self.admin = AdminServer(
                *config.admin,
                token=config.admin_token,
                names=[config.advertise] if config.advertise else (),
            )
            self._routes(self.admin)
        self.started_at = now_rfc3339()
        self._stop_event: asyncio.Event | None = None
        self._taking: asyncio.Task[None] | None = None
        self._commands: asyncio.Task[None] | None = None
        self._giver: Giver | None = None
        self.control: grpc.aio.Server | None = None
        self.control_port = 0
        self.membership: Membership = self._membership(config, role)

    def _membership(self, config: NodeConfig, role: WorkerRole | None) -> Membership:
        if not config.etcd:
            return StaticMembership(self.plane.set_upstreams)
        return EtcdMembership(
            EtcdStore(node_settings(config)),
            config,
            self.plane.set_upstreams,
            # A worker's node is registered by its supervisor.
            self._entry if role is None else None,
            lambda: self.plane.bound_addresses[0][0],
            self.plane.upstream_credentials,
        )

    async def start(self) -> None:
        self.plane.set_upstreams(self.config.upstreams)
        # Listen once the first view is in, so early clients are not parked;
        # if etcd is down, start anyway (clients wait up to --connect-timeout).
        if not await self.membership.follow():
            log.warning("etcd not reachable yet: listening without an upstream view")
        taker = None
        if self.taker_chan is not None:
            taker = Taker(self.taker_chan, self.plane, self.role.index if self.role else None)
        try:
            await self._bind(taker)
        except Exception as exc:
            if taker is not None:  # the predecessor carries on, and logs why
                await taker.refuse(f"the successor could not start: {exc}")
            raise
        # Registers once the listeners are bound; READY=1 for systemd once
        # registered (a supervisor speaks for its workers).
        ready = sdnotify.ReadyOnce(main_pid=taker is not None)
        await self.membership.join(ready if self.channel is None else None)
        if taker is not None:
            self._taking = asyncio.get_running_loop().create_task(taker.take_marks())
        log.info(
            "node %s (pmlb %s) ready: service %r, %d upstreams (%s), %s",
            self.config.node_id,
            __version__,
            self.config.service,
            len(self.plane.links),
            self.membership.source,
            describe_links(self.config.link_transport),
        )
        if self.channel is not None:
            self.channel.say("ready")
            self._commands = asyncio.get_running_loop().create_task(
                self.channel.commands(self._command)
            )

    async def _bind(self, taker: Taker | None) -> None:
        """Admin, control API, then the client listeners: bound here, or
        taken from the predecessor (a live handover)."""
        socks: list[socket.socket] = []
        admin_sock = None
        if taker is not None:
            socks, admin_sock = await taker.listeners()
        if self.admin is not None:
            await self.admin.start(admin_sock)
        if self.role is not None:
            self.internal_control, _ = await start_control(
                self.plane, "unix:" + control_socket(self.role.rundir, self.role.index), 0
            )
        await self._start_control()
        if self.channel is not None:
            # Every sibling bound what it needs before any of them takes a client.
            self.channel.say("prepared")
            await self.channel.wait_go()
        await self.plane.start(socks or None)
        if taker is not None:
            await taker.listening()

    async def _start_control(self) -> None:
        cfg = self.config
        if cfg.control is None:
            return
        creds = (
            grpc_server_credentials(cfg.control_cert, cfg.control_key, cfg.control_client_ca)
            if cfg.control_cert and cfg.control_key
            else None
        )
        host, port = cfg.control
        self.control, self.control_port = await start_control(
            self.plane,
            host,
            port,
            token=cfg.control_token,
            credentials=creds,
            siblings=self.siblings,
        )

    # -- live handover (SIGUSR2, pmlb.node.handover) ---------------------------------

    def hand_over(self) -> None:
        """Start a successor from this command line and hand it the
        listeners and every connection that can move; on success this
        process drains what stayed and exits."""
        if self._giving is not None and not self._giving.done():
            log.warning("handover: one is under way already; this request is ignored")
            return
        if self.draining() or self.handed_over:
            log.warning("handover: this node is stopping; nothing to hand over")
            return
        if not self.argv and self.role is None:
            log.warning("handover: no command line to start a successor from")
            return
        self._giving = asyncio.get_running_loop().create_task(self._give())

    def _command(self, line: str) -> None:
        """A line from the supervisor after "go" (a node of several)."""
        if line == "handover":
            self.hand_over()
        elif line == "handover-cancel":
            if self._giver is not None:
                self._giver.abandon()
        elif line:
            log.warning("the supervisor said %r; not understood", line[:40])

    async def _give(self) -> None:
        role = self.role
        self._giver = giver = Giver(
            self.plane,
            successor_argv(self.argv),
            lambda: (
                [a.sock for a in self.plane.acceptors],
                self.admin.listening_socket() if self.admin is not None else None,
            ),
            self._quiesce,
            self._revive,
        )
        # A worker's successor is started by the successor's supervisor and
        # comes to the rendezvous socket; the supervisor hears how it went.
        done = await giver.run(handover_socket(role.rundir, role.index) if role else "")
        if self.channel is not None:
            self.channel.say("handover", error="" if done else giver.why)
        if done:
            self.handed_over = True
            if self.admin is not None and self.role is None:
                await self.admin.stop()  # the successor answers on it alone now
            self.request_stop()

    async def _quiesce(self) -> None:
        """The successor serves control requests from now on. (Admin requests
        go to both processes until the handover is done: they share the
        listening socket, and a failed handover leaves nothing to rebind.)"""
        if self.control is not None:
            await self.control.stop(1.0)
            self.control = None

    async def _revive(self) -> None:
        """The handover failed after _quiesce: serve the control API again
        (the successor is gone, so are its sockets: retry briefly)."""
        backoff = Backoff(0.05, 1.0)
        for _ in range(20):
            try:
                if self.control is None:
                    await self._start_control()
                return
            except (OSError, RuntimeError) as exc:
                log.info("handover: the control address is not bindable yet (%s); retrying", exc)
                await asyncio.sleep(backoff.next())
        log.error("handover: could not serve the control API again")

    async def stop(self) -> None:
        log.info("node %s stopping", self.config.node_id)
        if self._taking is not None and not self._taking.done():
            # A successor told to stop takes nothing more: the predecessor
            # sees the channel close and keeps what it has not handed over.
            log.warning("handover: stopping before it completed; taking nothing more")
            self._taking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._taking
        if self.channel is None and not self.handed_over:
            # After a handover the successor is systemd's main process now.
            sdnotify.notify("STOPPING=1")
        # Leave the cluster first: give up the checker role and revoke the lease,
        # so other nodes take over and stop seeing us before we stop serving.
        await self.membership.leave()
        # Then drain: no new connections, open marks finish (failover still works,
        # the view keeps following etcd), the rest is closed gradually.
        await self.plane.drain(self.config.drain_timeout, self.config.drain_window)
        await self.plane.stop(self.config.shutdown_timeout)
        if self.control is not None:
            await self.control.stop(1.0)
        if self.internal_control is not None:
            await self.internal_control.stop(1.0)
        if self.siblings is not None:
            await self.siblings.close()
        if self.probation is not None:
            self.probation.close()
        if self.counters is not None:
            self.counters.close()
        await asyncio.to_thread(self.tracer.shutdown)
        await self.membership.close()
        if self.admin is not None:
            await self.admin.stop()
        log.info("node %s stopped", self.config.node_id)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration and apply what can change live.

        A configuration that does not parse is refused as a whole (logged;
        the running one stays). Of one that does, the fields in
        config.RELOADABLE are applied and every other change is refused with
        a log line naming it (it needs a restart). TLS certificates are
        re-read from their files every time."""
        if self.plane.tls is not None:
            self.plane.tls.reload()
        if self._reload_config is None:
            return
        try:
            new = self._reload_config()
        except ConfigError as exc:
            log.error("reload refused, the running configuration is kept: %s", exc)
            return
        apply, refused = config_changes(self.config, new)
        for name in refused:
            log.warning(
                "reload: --%s changed but cannot change live (needs a restart); kept",
                name.replace("_", "-"),
            )
        if not apply:
            log.info("reload: nothing to apply")
            return
        self.config = dataclasses.replace(self.config, **apply)
        self.plane.reconfigure(self.role.config(self.config) if self.role else self.config)
        if "log_level" in apply:
            logging.getLogger().setLevel(self.config.log_level.upper())
        self.membership.reconfigure(self.config, "upstreams" in apply)
        self.reloads += 1
        log.info("reload %d applied: %s", self.reloads, ", ".join(sorted(apply)))

    async def run(self, stop: asyncio.Event) -> int:
        self._stop_event = stop
        await self.start()
        await stop.wait()
        await self.stop()
        return 0

    def _entry(self) -> dict[str, object]:
        admin = (self.admin.host, self.admin.port) if self.admin else None
        return node_entry(
            self.config, self.plane.bound_addresses, self.control_port, admin, self.started_at
        )

    def node_sample(self) -> metrics.NodeSample:
        """This node's figures beyond NodeStats and the links, for /metrics."""
        acceptors = self.plane.acceptors
        return metrics.NodeSample(
            max_connections=self.config.max_connections,
            limit_pauses=sum(a.limit_pauses for a in acceptors),
            rate_pauses=sum(a.rate_pauses for a in acceptors),
            resource_errors=sum(a.resource_errors for a in acceptors),
            tasks=len(asyncio.all_tasks()),
            etcd=self.membership.sample(),
        )

    # -- admin --------------------------------------------------------------------

    def draining(self) -> bool:
        """A stop was asked for (SIGTERM, POST /drain or the test's event)."""
        return self._stop_event is not None and self._stop_event.is_set()

    def request_stop(self) -> None:
        """Stop as SIGTERM does: leave etcd, stop accepting, drain, exit 0."""
        if self._stop_event is not None:
            self._stop_event.set()

    def _routes(self, admin: AdminServer) -> None:
        add_node_routes(admin, self)
