"""``chat loadtest`` (chat/cluster/loadtest.py): small, bounded runs of each scenario
against a real LocalCluster (50 clients). Assertions are on outcomes and counts (everyone
live again, nothing lost or duplicated, the files written, one workspace load per Flannel
node), never on time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chat.cluster import loadtest
from chat.cluster.loadtest import Options, Run, write

CLIENTS = 50


def small(**kw: Any) -> Options:
    base: dict[str, Any] = dict(
        clients=CLIENTS, procs=2, rate=20.0, post_before=1.0, post_after=1.0, storm_max_s=30.0
    )
    return Options(**(base | kw))


async def run_and_write(opts: Options, tmp_path: Path) -> dict[str, Any]:
    result = await Run(opts).run()
    path, png = write(result, tmp_path / "loadtest.json", make_plot=True)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(path.read_text())["scenario"] == opts.scenario
    return result


def assert_delivered(r: dict[str, Any]) -> None:
    assert r["live_again"] == CLIENTS
    d = r["delivery"]
    assert d["stored"] > 0
    assert d["not_live"] == 0
    assert (d["lost"], d["duplicated"]) == (0, 0)
    for ws in d["per_workspace"]:
        assert ws["conns_exact"] == ws["conns"]  # every client holds every stored message


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cut", loadtest.CUTS)
async def test_storm_through_flannel(cut: str, tmp_path: Path) -> None:
    # A chat node's kill drops only some clients (or none, behind Flannel): the round ends
    # at --storm-max, so it is short here.
    opts = small(scenario="storm", cut=cut, storm_max_s=10.0 if cut == "chat" else 30.0)
    r = await run_and_write(opts, tmp_path)
    assert_delivered(r)
    assert r["storm"]["unfinished"] == r["storm"]["failed"] == 0
    assert r["latency_ms"]["after"]["n"] > 0  # the posters and observers came back too
    cost = r["storm_cost"]
    if cut in ("flannel", "haproxy", "client"):
        assert r["dropped"] == CLIENTS
    if cut == "flannel":
        # The clients of the killed node's workspace land on one other node: one upstream
        # load of that workspace there, not one per reconnecting client.
        assert r["storm"]["resumed"] + r["storm"]["resume_errors_total"] >= CLIENTS
        assert cost["flannel_loads_total"] == 1
        assert r["cut_detail"]["killed"] not in cost["flannel_loads"]
    elif cut in ("chat", "client"):
        assert cost["flannel_loads_total"] == 0  # the caches survive an upstream or edge cut


@pytest.mark.timeout(180)
async def test_storm_straight_to_chat(tmp_path: Path) -> None:
    opts = small(scenario="storm", cut="chat", flannel=False, storm_max_s=10.0)
    r = await run_and_write(opts, tmp_path)
    assert_delivered(r)
    assert 0 < r["dropped"] < CLIENTS  # the killed node's share (least connections)
    assert r["storm"]["resumed"] == r["dropped"]
    assert r["storm_cost"]["flannel_loads_total"] == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("scenario", ["chatter", "hot"])
async def test_posting(scenario: str, tmp_path: Path) -> None:
    r = await run_and_write(small(scenario=scenario, channels=4), tmp_path)
    assert_delivered(r)
    assert r["latency_ms"]["all"]["n"] > 0


@pytest.mark.timeout(180)
async def test_monday_cold_start(tmp_path: Path) -> None:
    r = await run_and_write(small(scenario="monday", workspaces=2), tmp_path)
    assert_delivered(r)
    cost = r["cold_cost"]
    # Each workspace is loaded once, on the one Flannel node its hash picks.
    assert cost["flannel_loads_total"] == 2
    assert cost["bytes_to_clients_per_client"] > 0
    assert len(r["delivery"]["per_workspace"]) == 2


def test_peak_rate_and_percentiles() -> None:
    assert loadtest.peak_rate([0, 10, 20, 150, 250]) == 30.0
    assert loadtest.peak_rate([]) == 0.0
    assert loadtest.pct([3, 1, 2], 0.5) == 2
    assert loadtest.pct([], 0.5) is None


def test_only_a_load_test_cluster_takes_plaintext_clients(tmp_path: Path) -> None:
    from chat.cluster.launcher import LocalCluster

    for plain in (False, True):
        cluster = LocalCluster(directory=tmp_path / str(plain), plain=plain)
        lines = cluster.haproxy.config.read_text().splitlines()
        at = lines.index("frontend public")
        assert lines[at + 1].lstrip().startswith("bind ") and " ssl " in lines[at + 1]
        second = lines[at + 2].strip()
        if plain:
            assert second.startswith(f"bind 127.0.0.1:{cluster.plain_port} ")
        else:
            assert cluster.plain_port is None and not second.startswith("bind ")
