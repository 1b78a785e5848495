"""The store: etcd behind a small asyncio interface, and its key layout.

``etcd`` is the only code that talks to etcd; ``keys`` is the only place the
key layout and value formats live; ``listwatch`` is the one loop that follows
a prefix. A new store backend goes here.
"""
