"""What pmlb's parts agree on, with no I/O: the bottom floor.

``wire``: Bridge frames and batches (the proto's messages, built and cut);
``reasons``: the close-reason vocabulary; ``ids``: marks and node ids;
``domain``: upstream specs, addresses and the names shared by the node, the
CLI and the SDK. Anything may import these; they import nothing of pmlb but
the generated ``_proto`` and ``errors``.
"""
