"""The conformance kit (``pmlb conformance``) against real upstreams.

The Python SDK passes every case over every Bridge transport (the kit on
nghttp2, grpclib and grpcio; the SDK on grpclib and grpcio); an upstream written from the contract
alone (tests/bridge_upstream.py) passes too, and each of its deliberate
faults fails exactly the cases that check the broken rule, with a line that
says what the upstream did.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pmlb.testing.conformance_kit import CASES, Options, Result, run_cases
from pmlb.upstream import UpstreamServer
from pmlb.upstream.conformance import ConformanceHandler
from tests.bridge_upstream import EXPECTED_FAILURES, BridgeUpstream, Fault
from tests.support import Proc, free_port, run_pmlb, wait_until

ALL = {c.name for c in CASES}


def failed(results: list[Result]) -> dict[str, str]:
    return {r.case.name: r.line for r in results if not r.passed}


# Each transport on each side: the kit (a node) on one, the SDK on the other
# (an SDK asked for nghttp2 serves with grpclib).
@pytest.mark.parametrize(
    ("kit_transport", "upstream_transport"),
    [("nghttp2", "grpclib"), ("nghttp2", "grpcio"), ("grpclib", "grpcio"), ("grpcio", "grpclib")],
)
async def test_the_python_sdk_passes_every_case(
    upstream_transport: str, kit_transport: str
) -> None:
    handler = ConformanceHandler()
    server = UpstreamServer(handler, upstream_id="py", transport=upstream_transport)
    handler.server = server
    port = await server.start()
    try:
        results = await run_cases(Options(f"127.0.0.1:{port}", kit_transport))
    finally:
        await server.stop(0.5)
    assert {r.case.name for r in results} == ALL
    assert failed(results) == {}
    # The SDK counted the kit's bad input and carried on.
    assert server.stats["garbage_batches"] >= 1
    assert server.stats["duplicates_skipped"] >= 1
    assert server.stats["handler_errors"] >= 1


async def test_an_upstream_written_from_the_contract_passes() -> None:
    upstream = BridgeUpstream()
    port = await upstream.start()
    try:
        results = await run_cases(Options(f"127.0.0.1:{port}", timeout=2.0))
    finally:
        await upstream.stop()
    assert failed(results) == {}


# What each fault's failing line must say (the kit's one line for the user).
FAULT_WORDS = {
    Fault.IGNORES_CREDIT: {"credit-respected": "no credit left"},
    Fault.NEVER_ACKS: {
        "data": "acknowledgement must ride on the reply",
        "ack-no-reply": "never acknowledged",
        "moved": "unacknowledged",
    },
    Fault.NEVER_GRANTS: {"credit-granted": "granted no credit"},
    Fault.NO_DEDUPE: {"replay": "handled twice"},
    Fault.PINGS_BEHIND_HANDLERS: {"ping": "answer pings from the reader"},
    Fault.SMALL_MESSAGES: {"large-batch": "64 MiB"},
    Fault.DIES_ON_GARBAGE: {"garbage": "stream failed"},
    Fault.NO_HELLO_CHECK: {"protocol-error": "kept a stream open"},
    Fault.RAISE_ENDS_STREAM: {"handler-error": "stream failed"},
}


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.value)
async def test_a_broken_upstream_fails_exactly_the_cases_of_its_fault(fault: Fault) -> None:
    upstream = BridgeUpstream({fault})
    port = await upstream.start()
    try:
        # 1 s per answer instead of the node's 5: the failing cases wait it out.
        results = await run_cases(Options(f"127.0.0.1:{port}", timeout=1.0))
    finally:
        await upstream.stop()
    lines = failed(results)
    assert set(lines) == EXPECTED_FAILURES[fault], lines
    for name, words in FAULT_WORDS[fault].items():
        assert words in lines[name], lines[name]


def test_the_command_passes_the_example_upstream_and_names_a_broken_one(tmp_path: Path) -> None:
    port = free_port()
    up = Proc(
        "echo",
        ["echo-upstream", "--conformance", "--listen", f"127.0.0.1:{port}"],
        tmp_path,
    )
    try:
        wait_until(lambda: "serving" in up.log(), 15, "the echo upstream to serve")
        ok = run_pmlb("conformance", f"127.0.0.1:{port}", timeout=120)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.count("\nPASS  ") == len(CASES)
        assert f"{len(CASES)} passed, 0 failed" in ok.stdout
        # Only some cases, by name; and the plain echo (not the conformance
        # handler) is told apart with a hint.
        picked = run_pmlb("conformance", f"127.0.0.1:{port}", "--case", "push", "--case", "meta")
        assert picked.returncode == 0, picked.stdout
        assert "2 passed, 0 failed" in picked.stdout
    finally:
        up.stop()
    plain_port = free_port()
    plain = Proc("plain", ["echo-upstream", "--listen", f"127.0.0.1:{plain_port}"], tmp_path)
    try:
        wait_until(lambda: "serving" in plain.log(), 15, "the echo upstream to serve")
        bad = run_pmlb(
            "conformance", f"127.0.0.1:{plain_port}", "--case", "hello", "--timeout", "2"
        )
        assert bad.returncode == 1
        assert "FAIL  hello" in bad.stdout, bad.stdout
        assert "conformance handler" in bad.stdout
        assert "see proto/README.md#1-hello-and-version-negotiation" in bad.stdout
    finally:
        plain.stop()
    usage = run_pmlb("conformance", "127.0.0.1:1", "--case", "nope")
    assert usage.returncode == 2
    assert "unknown case nope" in usage.stderr
