"""Cluster membership through the store: the etcd session and registration,
the service view (discovery), the elected health checker, and DNS records."""
