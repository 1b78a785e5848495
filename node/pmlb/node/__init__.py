"""A running node: the composition root and its processes.

``app.NodeApp`` builds the parts (data plane, cluster membership, admin and
control APIs, tracing) from a ``NodeConfig`` and runs them in one explicit
start and stop order; ``workers`` runs several of them as worker processes
under one supervisor; ``sdnotify`` tells systemd when the node is ready.
"""
