"""The cluster's deployment: deploy/haproxy.cfg and docker-compose.yml against the topology,
and (below) the launcher's cluster through the real HAProxy."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from chat.cluster import haproxy, render, tls
from chat.cluster.topology import (
    Endpoints,
    Role,
    Secrets,
    Topology,
    environment,
    redis_args,
)
from tests.pg import free_port

HAPROXY_BIN = shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HAPROXY_BIN, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )


# ----------------------------------------------------------------------------- static


def test_rendered_files_are_up_to_date() -> None:
    assert render.main(["--check"]) == 0, "run: python -m chat.cluster.render"


def test_haproxy_accepts_the_deploy_config(tmp_path: Path) -> None:
    _, bundle = tls.self_signed(tmp_path)
    text = render.HAPROXY_CFG.read_text().replace(render.CERT_IN_CONTAINER, str(bundle))
    (tmp_path / "haproxy.cfg").write_text(text)
    result = haproxy_check(tmp_path / "haproxy.cfg")
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_accepts_the_launcher_config(tmp_path: Path) -> None:
    topology = Topology(n_chat=3, n_flannel=1)
    _, bundle = tls.self_signed(tmp_path)
    text = haproxy.render(
        topology,
        Endpoints.local(topology, free_port),
        cert=str(bundle),
        stats_socket=str(tmp_path / "admin.sock"),
    )
    (tmp_path / "haproxy.cfg").write_text(text)
    result = haproxy_check(tmp_path / "haproxy.cfg")
    assert result.returncode == 0, result.stdout + result.stderr
    assert text.count("slowstart") == 3 and "balance url_param workspace" in text


def test_compose_matches_the_topology() -> None:
    doc = yaml.safe_load(render.COMPOSE.read_text())
    services = doc["services"]
    topology = Topology()
    ends, secrets = Endpoints.compose(topology), Secrets.compose()
    expected = {s.name for s in topology.services} | {"migrate"}
    assert set(services) == expected
    by_role = {s.name: s.role for s in topology.services}
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert published == [f"{ends.public.port}:{ends.public.port}"]  # one port for clients
    for name, svc in services.items():
        role = by_role.get(name)
        if role in (Role.CHAT, Role.FLANNEL):
            module = "chat" if role is Role.CHAT else "flannel"
            assert svc["command"] == ["python", "-m", module, "serve"]
            assert svc["environment"] == environment(topology, ends, secrets, name)
            assert "readyz" in " ".join(svc["healthcheck"]["test"])
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"
    assert services["redis"]["command"][1:] == redis_args(ends, secrets)
    assert "default" in services["redis"]["command"] and "off" in services["redis"]["command"]
    assert services["postgres"]["environment"]["POSTGRES_INITDB_ARGS"] == "--auth=scram-sha-256"
    # Flannel goes to the chat tier through HAProxy's internal frontend.
    for name in topology.flannel_nodes:
        upstream = json.loads(services[name]["environment"]["FLANNEL_UPSTREAM"])
        assert upstream == [f"ws://haproxy:{ends.internal.port}/service"]
    assert topology.service("haproxy").talks_to == (*topology.flannel_nodes, *topology.chat_nodes)


def test_compose_secrets_have_dev_only_defaults() -> None:
    text = render.COMPOSE.read_text()
    for var in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "SERVICE_SECRET", "TOKEN_SECRET"):
        assert f"${{{var}:-dev-only-" in text


@pytest.mark.parametrize("name", ["postgres", "redis", "haproxy"])
def test_environment_is_only_for_our_nodes(name: str) -> None:
    topology = Topology()
    with pytest.raises(ValueError):
        environment(topology, Endpoints.compose(topology), Secrets.compose(), name)
