"""The dashboard pages, served by a node's admin endpoint (``dashboard.html``)
and by ``pmlb dashboard`` (``cluster.html``) at / and /dashboard.

Static files shipped in the package beside this module (the two pages and the
``pmlb.js`` / ``pmlb.css`` they share): no build step, no CDN, nothing fetched
from the internet. The node page polls ``/api/status`` (open: the node and its
upstreams) every 2 s, backing off to 30 s while the node does not answer, and
for marks ``/connections`` and ``/api/mark`` (client addresses and metadata:
behind the admin token like /connections; the page asks for it on a 401).
Actions (close a mark, drain the node or an upstream) ask for confirmation and
use the same token.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from pmlb.observability.admin import AdminServer, Route

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


@cache
def _asset(name: str) -> bytes:
    return resources.files("pmlb.observability").joinpath(name).read_bytes()


def add_page_routes(admin: AdminServer, page: str) -> None:
    """Serve ``page`` (a file beside this module) at / and /dashboard, with the
    shared script and styles. All open: they carry no data, only code."""

    def serve(name: str) -> Route:
        ctype = _TYPES[name[name.rindex(".") :]]

        async def handler(query: str) -> tuple[int, str, bytes]:
            return 200, ctype, _asset(name)

        return handler

    for path, name in (
        ("/", page),
        ("/dashboard", page),
        ("/pmlb.js", "pmlb.js"),
        ("/pmlb.css", "pmlb.css"),
    ):
        admin.route("GET", path, serve(name))
