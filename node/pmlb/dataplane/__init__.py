"""The data plane: listener, marks, framing, balancing and links to upstreams.

Nothing here talks to etcd; the composition root (pmlb.node.app) feeds it the
upstream set from whatever discovery is configured.
"""
