"""The node's dashboard page, served by the admin endpoint at / and /dashboard.

One static HTML file with its script and styles inline (``dashboard.html``
beside this module, shipped in the package): no build step, no CDN, nothing
fetched from the internet. The page polls the node's JSON endpoints:
``/api/status`` (open: the node and its upstreams) every 2 s, backing off to
30 s while the node does not answer, and, for marks, ``/connections`` and
``/api/mark`` (client addresses and metadata: behind the admin token like
/connections, which the page asks for when the node answers 401). Actions
(close a mark, drain the node) ask for confirmation and use the same token.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def dashboard_page() -> bytes:
    return resources.files("pmlb.observability").joinpath("dashboard.html").read_bytes()
