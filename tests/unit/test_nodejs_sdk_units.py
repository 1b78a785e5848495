"""The Node.js SDK's own unit tests (node:test, node/upstream-js/test), run by
the main suite so that `make test` and CI cover them."""

from __future__ import annotations

import subprocess

from tests.conftest import JS_SDK


def test_the_nodejs_sdk_unit_tests_pass(node_bin: str) -> None:
    r = subprocess.run(
        [node_bin, "--test", "test/"],
        check=False,
        cwd=JS_SDK,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "# fail 0" in r.stdout
    assert "# pass 0" not in r.stdout
