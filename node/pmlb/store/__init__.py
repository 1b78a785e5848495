"""The store: etcd behind a small asyncio interface, and its key layout.

``base`` is the seam (``Store``, its types and errors); ``etcd`` is the only
code that talks to etcd; ``memory`` is a store in the process for unit tests;
``keys`` is the only place the key layout and value formats live;
``listwatch`` is the one loop that follows a prefix. A new store backend
goes here, as a class with ``Store``'s methods.
"""
