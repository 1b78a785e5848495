"""pmlb.transport.libpatch against the libraries installed (issue [18]): each
internal it relies on is still there and still does what the patch assumes,
so a grpclib, h2 or hyperframe release that changes one fails here, by name,
rather than in a link at run time."""

from __future__ import annotations

import asyncio
import importlib.metadata
import tomllib

import grpclib.client
import grpclib.server
import hyperframe.frame
import pytest
from packaging.requirements import Requirement

from pmlb.transport import h2lib, libpatch
from tests.support import ROOT, async_wait_until


def test_every_internal_is_there() -> None:
    libpatch.check()  # raises LibraryChanged, naming it, otherwise


def test_the_ranges_are_pyprojects_and_the_installed_versions_are_in_them() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {r.name: r.specifier for r in map(Requirement, deps)}
    for lib, (low, high) in libpatch.SUPPORTED.items():
        assert set(str(declared[lib]).split(",")) == {low, high}, (lib, declared[lib])
        assert importlib.metadata.version(lib) in declared[lib], lib


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 12, 100, 1 << 20])
def test_frame_body_repr_is_unchanged_but_reads_only_the_start(size: int) -> None:
    # The library's own, saved before pmlb replaced it. (Not importlib.reload:
    # that made new hyperframe frame classes, and every grpclib connection
    # opened later in the same process failed with KeyError: SettingsFrame.)
    original = libpatch.LIBRARY_RAW_DATA_REPR
    assert original is not libpatch.raw_data_repr
    assert hyperframe.frame._raw_data_repr is libpatch.raw_data_repr  # as pmlb runs
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    assert libpatch.raw_data_repr(data) == original(data)


def test_grpclib_streams_read_messages_through_the_installed_function() -> None:
    """The patch replaces recv_message in grpclib.client and grpclib.server:
    their streams must look it up there, by name, when they read."""
    assert grpclib.client.recv_message is h2lib._recv_message  # type: ignore[attr-defined]
    assert grpclib.server.recv_message is h2lib._recv_message  # type: ignore[attr-defined]
    for stream in (grpclib.client.Stream, grpclib.server.Stream):
        assert "recv_message" in stream.recv_message.__code__.co_names, stream


async def test_a_grpclib_connection_has_what_the_keepalive_and_frame_size_patches_use() -> None:
    """Both patches work on a live connection's internals: the h2 connection
    (``_connection``) and the keepalive's ``_ping``, ``_ping_handle`` and
    ``_close_by_ping_handler``. A real client and server on loopback."""
    server = h2lib.Server(lambda stream: asyncio.sleep(0), tls=None)
    port = await server.start("127.0.0.1:0")
    try:
        channel = h2lib._Channel("127.0.0.1", port, config=h2lib.CLIENT_CONFIG)
        try:
            async with asyncio.timeout(10):
                protocol = await channel.__connect__()
            conn = protocol.connection
            for name in ("_ping", "_ping_handle", "_close_by_ping_handler"):
                assert hasattr(conn, name), name
            # This side advertised the large frame size: h2 applies it to its
            # local settings once the server acknowledges the SETTINGS frame.
            settings = conn._connection.local_settings
            await async_wait_until(
                lambda: settings.max_frame_size == h2lib.MAX_FRAME_SIZE, 10, "SETTINGS acked"
            )
            assert conn._ping.__name__ == "patient_ping"
        finally:
            channel.close()
    finally:
        await server.stop(0)


def test_a_missing_internal_is_named_with_the_supported_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(grpclib.client.Stream, "_maybe_raise")
    with pytest.raises(libpatch.LibraryChanged, match=r"grpclib 0\.4\.\d+ has no .*_maybe_raise"):
        libpatch.check()
