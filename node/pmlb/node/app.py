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
import dataclasses
import logging
import time
from collections.abc import Callable

import grpc

from pmlb import __version__
from pmlb.aio import wait_event
from pmlb.cluster.checker import Checker, CheckSettings
from pmlb.cluster.discovery import ServiceView
from pmlb.cluster.registration import Registration, node_entry
from pmlb.cluster.session import Session
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
from pmlb.node.routes import add_node_routes
from pmlb.node.workers import SupervisorChannel, WorkerRole, supervisor_channel
from pmlb.observability import metrics
from pmlb.observability.admin import AdminServer
from pmlb.observability.stats import NodeStats
from pmlb.observability.tracing import ConnTracer
from pmlb.store.etcd import EtcdStore, node_settings
from pmlb.store.keys import Keys, now_rfc3339
from pmlb.tlsconf import grpc_server_credentials

log = logging.getLogger("pmlb.app")


class NodeApp:
    def __init__(
        self,
        config: NodeConfig,
        reload_config: Callable[[], NodeConfig] | None = None,
        role: WorkerRole | None = None,
    ) -> None:
        self.config = config
        self.role = role
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
        self.store: EtcdStore | None = None
        self.session: Session | None = None
        self.view: ServiceView | None = None
        self.checker: Checker | None = None
        self.started_at = now_rfc3339()
        self._stop_event: asyncio.Event | None = None
        self.control: grpc.aio.Server | None = None
        self.control_port = 0
        if config.etcd:
            self.store = EtcdStore(node_settings(config))
            self.keys = Keys(config.etcd_prefix)
            self.session = Session(self.store, config.lease_ttl)
            if role is None:  # a worker's node is registered by its supervisor
                self.session.on_new_lease(
                    Registration(
                        self.store,
                        self.keys,
                        config,
                        self._entry,
                        lambda: self.plane.bound_addresses[0][0],
                    )
                )
            self.view = ServiceView(self.store, self.keys, config.service, self.plane.set_upstreams)
            self.checker = Checker(
                self.store,
                self.keys,
                self.session,
                self.view,
                config.node_id,
                CheckSettings(
                    config.check_interval,
                    config.check_timeout,
                    config.check_rise,
                    config.check_fall,
                ),
                credentials=self.plane.upstream_credentials,
            )

    async def start(self) -> None:
        self.plane.set_upstreams(self.config.upstreams)
        if self.store is not None and self.view is not None:
            await self.store.connect()
            self.view.start()
            # Listen once the first view is in, so early clients are not parked;
            # if etcd is down, start anyway (clients wait up to --connect-timeout).
            if not await wait_event(self.view.synced, 5.0):
                log.warning("etcd not reachable yet: listening without an upstream view")
        if self.admin is not None:
            await self.admin.start()
        cfg = self.config
        if self.role is not None:
            self.internal_control, _ = await start_control(
                self.plane, "unix:" + control_socket(self.role.rundir, self.role.index), 0
            )
        if cfg.control is not None:
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
        if self.channel is not None:
            # Every sibling bound what it needs before any of them takes a client.
            self.channel.say("prepared")
            await self.channel.wait_go()
        await self.plane.start()
        if self.session is not None and self.checker is not None:
            if self.channel is None:
                # READY=1 for systemd once registered (after the registration callback).
                self.session.on_new_lease(sdnotify.ReadyOnce())
            self.session.start()  # registers once the listeners are bound
            self.checker.start()
        log.info(
            "node %s (pmlb %s) ready: service %r, %d upstreams (%s)",
            self.config.node_id,
            __version__,
            self.config.service,
            len(self.plane.links),
            "from etcd" if self.store else "static",
        )
        if self.channel is not None:
            self.channel.say("ready")
        elif self.session is None:  # systemd's readiness (a supervisor speaks for workers)
            await sdnotify.ReadyOnce()()

    async def stop(self) -> None:
        log.info("node %s stopping", self.config.node_id)
        if self.channel is None:
            sdnotify.notify("STOPPING=1")
        # Leave the cluster first: give up the checker role and revoke the lease,
        # so other nodes take over and stop seeing us before we stop serving.
        if self.checker is not None:
            await self.checker.stop()
        if self.session is not None:
            await self.session.stop(revoke=True)
        # Then drain: no new connections, open marks finish (failover still works,
        # the view keeps following etcd), the rest is closed gradually.
        await self.plane.drain(self.config.drain_timeout, self.config.drain_window)
        if self.view is not None:
            await self.view.stop()
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
        if self.store is not None:
            await self.store.close()
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
        if self.checker is not None:
            self.checker.settings = CheckSettings(
                self.config.check_interval,
                self.config.check_timeout,
                self.config.check_rise,
                self.config.check_fall,
            )
        if "upstreams" in apply and self.store is None:
            self.plane.set_upstreams(self.config.upstreams)
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
        etcd = None
        if self.session is not None and self.view is not None and self.checker is not None:
            now = time.monotonic()
            etcd = metrics.EtcdSample(
                session_up=self.session.healthy,
                lease_grants=self.session.grants,
                keepalive_age=now - self.session.last_ok if self.session.last_ok else -1.0,
                view_resyncs=self.view.resyncs,
                malformed_values=self.view.malformed,
                watch_age=now - self.view.last_event if self.view.last_event else -1.0,
                is_checker=self.checker.is_checker,
                health_probes=self.checker.probes,
                health_writes=self.checker.writes,
            )
        return metrics.NodeSample(
            max_connections=self.config.max_connections,
            limit_pauses=sum(a.limit_pauses for a in acceptors),
            rate_pauses=sum(a.rate_pauses for a in acceptors),
            resource_errors=sum(a.resource_errors for a in acceptors),
            tasks=len(asyncio.all_tasks()),
            etcd=etcd,
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
