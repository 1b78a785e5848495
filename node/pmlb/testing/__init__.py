"""Tools for testing a pmlb deployment or an upstream, shipped with the package.

``localetcd`` starts a throwaway etcd (the demo and the suite use it);
``conformance_kit`` is ``pmlb conformance``: it connects to an upstream as a
node would and checks it against the Bridge contract, case by case.
"""
