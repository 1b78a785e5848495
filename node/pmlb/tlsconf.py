"""TLS material: the client-facing listener context (reloadable) and gRPC
credentials for node <-> upstream mutual TLS.

The listener's SSLContext is created once and re-loaded in place on SIGHUP:
connections already established keep their session, new handshakes get the
new certificate, and nothing is dropped. Key files are read, never logged.
"""

from __future__ import annotations

import logging
import ssl

import grpc

from pmlb.errors import ConfigError
from pmlb.transport import ClientTLS, ServerTLS
from pmlb.transport.cgrpc import channel_credentials, server_credentials

log = logging.getLogger("pmlb.tls")


class ListenerTLS:
    def __init__(self, cert: str, key: str, client_ca: str | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        if client_ca:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(cafile=client_ca)
        self.reloads = 0
        self.load()

    def load(self) -> None:
        try:
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate {self.cert}: {exc}") from None

    def reload(self) -> bool:
        """Re-read the certificate and key (SIGHUP); keep the old ones on error."""
        try:
            self.load()
        except ConfigError as exc:
            log.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        return True


def upstream_channel_credentials(
    ca: str | None, cert: str | None, key: str | None
) -> grpc.ChannelCredentials | None:
    """grpcio credentials for reaching upstreams (the checker's health probes;
    mTLS when cert and key are given)."""
    if not (ca or cert):
        return None
    if bool(cert) != bool(key):
        raise ConfigError("--upstream-cert and --upstream-key go together")
    return channel_credentials(ClientTLS(ca, cert, key))


def grpc_server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """Credentials for a grpcio server (an upstream's Bridge, the node's control
    API); with ``client_ca`` it demands a client certificate signed by it (mTLS)."""
    return server_credentials(ServerTLS(cert, key, client_ca))
