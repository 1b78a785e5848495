"""pmlb, the persistent marking load balancer.

Long-lived raw TCP clients connect to a cluster of pmlb nodes; each connection
gets a cluster-unique *mark*, and its traffic is multiplexed, frame by frame and
tagged with the mark, over gRPC streams to stateless upstream servers.
"""

__version__ = "0.1.0"
# The distribution's name on the package index ("pmlb" there is another project).
DISTRIBUTION = "pmlb-lb"
