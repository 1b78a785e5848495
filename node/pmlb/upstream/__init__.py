"""Write a pmlb upstream in Python: see pmlb.upstream.sdk."""

from pmlb.upstream.sdk import Conn, Handler, UpstreamServer

__all__ = ["Conn", "Handler", "UpstreamServer"]
