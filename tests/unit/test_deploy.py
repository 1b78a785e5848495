"""deploy/ cannot run here (no Docker engine, no cluster), so check it statically:
every file parses, every pmlb command line and PMLB_* variable is one the CLI
accepts (and validates), config files hold only known keys, probes and ports
match what the node listens on, and the image the manifests run is the one the
Dockerfile builds."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pmlb.commands.cli import build_parser
from pmlb.config import DNS_SYNC_OPTIONS, ECHO_OPTIONS, NODE_OPTIONS, node_config, resolve
from tests.support import ROOT, needs

DEPLOY = ROOT / "deploy"
OPTIONS = {"node": NODE_OPTIONS, "echo-upstream": ECHO_OPTIONS, "dns-sync": DNS_SYNC_OPTIONS}


def check_command(argv: list[str], env: dict[str, str], files: dict[str, Path]) -> dict[str, Any]:
    """Parse ``pmlb ARGV`` with the real parser; validate a node's whole config."""
    argv = [files.get(a, a) if isinstance(a, str) else a for a in argv]
    args = build_parser().parse_args([str(a) for a in argv])  # exits 2 on an unknown flag
    options = OPTIONS.get(args.command)
    if options is None:
        return {}
    known = {o.env for o in options} | {"PMLB_CONFIG"}
    unknown = sorted(k for k in env if k.startswith("PMLB_") and k not in known)
    assert not unknown, f"{args.command}: unknown variables {unknown}"
    values = resolve(options, args, env)
    if args.command == "node":
        node_config(values)  # raises ConfigError on any invalid value
    return values


def test_dockerfile_builds_a_non_root_pmlb_image() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["pmlb"]' in text
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M), "SIGTERM is the drain signal"
    assert re.search(r"^ARG BASE=", text, re.M), "the base image is a build argument"
    assert re.search(r"^USER 10001$", text, re.M)
    final = text.rsplit("\nFROM ", 1)[1]  # the image's own stage carries the labels
    for label in ("title", "version", "licenses", "description"):
        assert f"org.opencontainers.image.{label}=" in final, label
    assert "LABEL pmlb.stage=build" in text.rsplit("\nFROM ", 1)[0], "make image prunes by it"
    for port in ("9000", "9100", "9200", "7001"):
        assert port in text.split("EXPOSE", 1)[1].splitlines()[0]
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies a missing {src}"


def test_compose_services_run_valid_commands() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    built = {n for n, s in services.items() if "build" in s}
    assert {"n1", "n2", "n3", "u1", "u2", "register"} <= built
    for s in built:
        assert services[s]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (
            DEPLOY / "compose" / services[s]["build"]["context"] / "deploy" / "Dockerfile"
        ).exists()
    assert sum(1 for n in services if re.fullmatch(r"etcd\d", n)) == 3
    # etcd's maintainers advise against 3.5.0-3.5.2 (a data-inconsistency bug).
    tag = services["etcd1"]["image"].rsplit(":v", 1)[1]
    major, minor, patch = map(int, tag.split("."))
    assert (major, minor) == (3, 5)
    assert patch >= 3, tag
    assert "jaeger" in services
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    nodes = [n for n in built if services[n]["command"][0] == "node"]
    assert len(nodes) == 3
    for name in nodes:
        svc = services[name]
        values = check_command(svc["command"], svc["environment"], {})
        ip = svc["networks"]["pmlb"]["ipv4_address"]
        assert values["dns_address"] == ip, "each node publishes its own address"
        assert values["otlp_endpoint"] is None
        assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://jaeger:")
        # The image's contract: SIGTERM drains; the grace period covers the drain.
        grace = int(svc["stop_grace_period"].removesuffix("s"))
        assert grace >= values["drain_timeout"] + values["drain_window"]
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert all(u.split("//")[1].split(":")[0] in services for u in values["etcd"][0].split(","))
    for name in ("u1", "u2"):
        check_command(services[name]["command"], services[name].get("environment", {}), {})
    for line in services["register"]["command"][0].split("&&"):
        parts = shlex.split(line)
        assert parts[0] == "pmlb"
        check_command(parts[1:], services["register"]["environment"], {})
        assert parts[4].split(":")[0] in services, "the upstream address is a service"
    # etcd with authentication: set up first by etcd_auth.py (tested against a
    # real etcd in tests/integration/test_compose_etcd_auth.py); whatever writes
    # etcd uses the pmlb user and waits for the set-up; CoreDNS reads as coredns.
    auth = services["etcd-auth"]
    script = auth["volumes"][0].split(":")[0]
    assert (DEPLOY / "compose" / script).exists()
    assert auth["entrypoint"][-1] == auth["volumes"][0].split(":")[1]
    for name in [*nodes, "register"]:
        env = services[name]["environment"]
        assert env["PMLB_ETCD_USER"] == "pmlb", name
        assert env["PMLB_ETCD_PASSWORD"].startswith("${PMLB_ETCD_PASSWORD:?"), name
    for name in ("register", "coredns"):
        done = services[name]["depends_on"]["etcd-auth"]["condition"]
        assert done == "service_completed_successfully", name
    assert all("etcd-auth" in services[n]["depends_on"] or "register" in services[n]["depends_on"]
               for n in nodes)  # fmt: skip
    assert (
        "credentials coredns {$COREDNS_ETCD_PASSWORD}"
        in (DEPLOY / "compose" / "Corefile").read_text()
    )
    assert "COREDNS_ETCD_PASSWORD" in services["coredns"]["environment"]
    corefile = (DEPLOY / "compose" / "Corefile").read_text()
    assert "path /skydns" in corefile
    dns_name = services["n1"]["environment"]["PMLB_DNS_NAME"]
    assert corefile.startswith("#")
    assert f"{dns_name.split('.', 1)[1]}:53" in corefile
    assert services["client"]["dns"] == [services["coredns"]["networks"]["pmlb"]["ipv4_address"]]


def test_kubernetes_manifests(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "base" / "pmlb.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    cm = kinds["ConfigMap"]["data"]
    toml_path = tmp_path / "node.toml"
    toml_path.write_text(cm["node.toml"])
    tomllib.loads(cm["node.toml"])
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value", "x") for e in c["env"]}
    env["PMLB_ETCD"] = cm["PMLB_ETCD"]
    env["PMLB_NODE_ID"] = "pmlb-7d9c-abcde"
    values = check_command(c["args"], env, {"/etc/pmlb/node.toml": toml_path})
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(values["listen"][0].rsplit(":", 1)[1]) == ports["clients"]
    assert int(values["admin"].rsplit(":", 1)[1]) == ports["admin"]
    assert int(values["control"].rsplit(":", 1)[1]) == ports["control"]
    assert values["workers"] == 1, "one node process per pod: probes reach worker 0 only"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert f":{ports['admin']}/drain" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    grace = values["drain_timeout"] + values["drain_window"]
    assert pod["terminationGracePeriodSeconds"] > grace
    assert c["image"].startswith("pmlb:")
    svc = kinds["Service"]["spec"]
    assert svc["clusterIP"] == "None", "headless: DNS round-robin over ready pods"
    assert svc["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert (
        kinds["PodDisruptionBudget"]["spec"]["minAvailable"]
        < kinds["Deployment"]["spec"]["replicas"]
    )
    assert pod["securityContext"]["runAsUser"] == 10001


def test_systemd_unit_and_config() -> None:
    unit = (DEPLOY / "systemd" / "pmlb-node.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M)
    assert exec_start
    argv = shlex.split(exec_start.group(1))
    assert argv[0].endswith("/pmlb")
    toml = DEPLOY / "systemd" / "node.toml"
    # The secrets its header tells the operator to put in /etc/pmlb/node.env
    # (EnvironmentFile): the control API on a private address needs its token.
    assert re.search(r"^EnvironmentFile=-?/etc/pmlb/node.env$", unit, re.M)
    secrets = dict.fromkeys(re.findall(r"(PMLB_[A-Z_]+)=\.\.\.", toml.read_text()), "s3cret")
    assert "PMLB_CONTROL_TOKEN" in secrets, secrets
    values = check_command(argv[1:], secrets, {"/etc/pmlb/node.toml": toml})
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert stop > values["drain_timeout"] + values["drain_window"]
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.M)
    keys = tomllib.loads(toml.read_text())
    assert not [k for k in keys if "password" in k or "token" in k], "no secret in the config file"


def test_a_bad_flag_would_be_caught() -> None:
    with pytest.raises(SystemExit):
        check_command(["node", "--no-such-flag", "1"], {}, {})
    with pytest.raises(AssertionError, match="unknown variables"):
        check_command(["node", "--listen", "h:1", "--upstream", "h:2"], {"PMLB_LISTN": "x"}, {})


def _kustomize(path: Path) -> list[dict[str, Any]]:
    r = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@needs(
    None
    if shutil.which("kubectl")
    else "kubectl is not installed: apt-get install kubernetes-client (kubectl kustomize)"
)
def test_kustomize_base_and_the_external_lb_overlay(tmp_path: Path) -> None:
    """The Kubernetes example as kustomize renders it (issue [17]): the base
    is the plain manifest, pods hardened (non-root, read-only root filesystem
    with /tmp as an emptyDir, every capability dropped); the overlay adds a
    LoadBalancer Service whose load balancer sends PROXY headers, and trusts
    its range on the nodes, whose configuration stays valid."""
    base = {(d["kind"], d["metadata"]["name"]): d for d in _kustomize(DEPLOY / "k8s" / "base")}
    pod = base[("Deployment", "pmlb")]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    tmp = next(v for v in c["volumeMounts"] if v["mountPath"] == "/tmp")
    assert any(v["name"] == tmp["name"] and "emptyDir" in v for v in pod["volumes"])

    overlay = {
        (d["kind"], d["metadata"]["name"]): d
        for d in _kustomize(DEPLOY / "k8s" / "overlays" / "external-lb")
    }
    assert set(overlay) == set(base) | {("Service", "pmlb-external")}
    lb = overlay[("Service", "pmlb-external")]
    assert lb["spec"]["type"] == "LoadBalancer"
    assert (
        lb["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"]
        == "*"
    )
    (node,) = overlay[("Deployment", "pmlb")]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "x") for e in node["env"]}
    assert "PMLB_ADMIN_TOKEN" in env, "the base's env is kept, the patch adds to it"
    cm = overlay[("ConfigMap", "pmlb")]["data"]
    toml_path = tmp_path / "node.toml"
    toml_path.write_text(cm["node.toml"])
    env["PMLB_ETCD"] = cm["PMLB_ETCD"]
    values = check_command(node["args"], env, {"/etc/pmlb/node.toml": toml_path})
    assert values["proxy_trusted"] == [env["PMLB_PROXY_TRUSTED"]]
