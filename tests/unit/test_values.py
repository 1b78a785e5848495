"""etcd values and config values: property tests. Anything an operator can type
parses to a valid spec or fails with InvalidValue / ConfigError, nothing else."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pmlb.config import parse_hostport, parse_static_upstream
from pmlb.errors import ConfigError
from pmlb.store.keys import (
    InvalidValue,
    Keys,
    UpstreamSpec,
    format_upstream,
    load_json,
    parse_health,
    parse_node,
    parse_upstream,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_invalid_value(raw: bytes) -> None:
    for parse in (parse_upstream, parse_health, parse_node):
        with contextlib.suppress(InvalidValue):
            parse("x", raw)


@given(
    st.dictionaries(st.sampled_from(["addr", "weight", "drain", "other"]), json_values, max_size=4)
)
def test_any_json_object_parses_to_a_sane_spec_or_is_refused(obj: dict[str, object]) -> None:
    try:
        spec = parse_upstream("u", json.dumps(obj).encode())
    except InvalidValue:
        return
    assert 1 <= spec.weight <= 10_000
    assert isinstance(spec.drain, bool)
    parse_hostport(spec.addr)


@given(
    host=st.sampled_from(["127.0.0.1", "10.1.2.3", "[::1]", "upstream.example"]),
    port=st.integers(0, 65535),
    weight=st.integers(1, 10_000),
    drain=st.booleans(),
)
def test_format_then_parse_round_trips(host: str, port: int, weight: int, drain: bool) -> None:
    spec = UpstreamSpec(id="u", addr=f"{host}:{port}", weight=weight, drain=drain)
    assert parse_upstream("u", format_upstream(spec).encode()) == spec


@given(st.text(max_size=60))
def test_static_upstream_and_hostport_only_raise_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_static_upstream(text)
    with contextlib.suppress(ConfigError):
        parse_hostport(text)


@given(st.text(max_size=40))
def test_key_leaves_are_plain_ids_or_refused(leaf: str) -> None:
    keys = Keys("/pmlb")
    try:
        got = Keys.leaf(keys.upstreams("echo"), keys.upstreams("echo") + leaf)
    except InvalidValue:
        return
    assert got == leaf
    assert "/" not in got


@pytest.mark.parametrize(
    "parse",
    [
        lambda v: parse_upstream("u1", v),
        lambda v: parse_health("u1", v),
        lambda v: parse_node("n1", v),
    ],
)
def test_over_deep_or_over_large_json_is_an_invalid_value(parse: Any) -> None:
    """A 2 KB value nested 1,000 deep made json.loads raise RecursionError,
    which killed discovery; now it is refused like any malformed value."""
    deep = b'{"addr":' + b"[" * 1000 + b"]" * 1000 + b"}"
    with pytest.raises(InvalidValue, match="deeper"):
        parse(deep)
    with pytest.raises(InvalidValue, match="bytes"):
        parse(b'{"addr": "' + b"x" * (70 << 10) + b'"}')


def test_depth_counting_ignores_brackets_inside_strings() -> None:
    value = {"addr": "[" * 20 + '\\"' + "{" * 10, "n": [[1]]}
    assert load_json("v", json.dumps(value)) == value


def test_etcd_target_uses_every_endpoint_resolving_names_and_ipv6_literals() -> None:
    """With hostnames only the first endpoint was used (dns:///first); an IPv6
    literal made an invalid target."""
    from pmlb.store.etcd import EtcdSettings, EtcdStore

    def target(*endpoints: str) -> str:
        return EtcdStore(EtcdSettings(endpoints=endpoints))._target()[0]

    assert target("http://localhost:2379", "http://127.0.0.2:2379", "127.0.0.3:2379") == (
        "ipv4:127.0.0.1:2379,127.0.0.2:2379,127.0.0.3:2379"
    )
    assert target("http://[::1]:2379", "http://[::1]:2380") == "ipv6:[::1]:2379,[::1]:2380"
    with pytest.raises(ConfigError, match="bad endpoint"):
        target("http://[::1]")
