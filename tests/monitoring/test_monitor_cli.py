"""``aimass monitor ...`` against a real stack (data, registry, routing, evaluation): create a
monitor from the command line, send a drifted stream, run it, read its alert, pause, delete.
The CLI runs in a worker thread, so the services keep serving on the test's event loop."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from aimass.cli.main import app


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_monitor_cli(monitoring) -> None:
    env = monitoring
    address = env.stack.address("evaluation")

    async def aimass(*args: str) -> tuple[int, str]:
        argv = ["monitor", *args, "--address", address]
        result = await asyncio.to_thread(CliRunner().invoke, app, argv)
        return result.exit_code, result.output

    await env.deploy("shifted", sample_rate=1.0)
    create = ("create", "shifted", "--deployment", "shifted", "--interval", "1h", "--window", "10m")
    code, out = await aimass(*create, "--rule", "input-drift:feature_size:0.25")
    assert code == 2, out
    assert "metric must be one of" in out
    code, out = await aimass(
        *create, "--rule", "input-drift:feature_psi:0.25:500", "--window", "1y"
    )
    assert code == 2, out
    assert "--window" in out
    code, out = await aimass("list", "--json")
    assert (code, json.loads(out)) == (0, {"monitors": []})

    code, out = await aimass(
        *create, "--rule", "input-drift:feature_psi:0.25:500", "--rule", "errors:error_rate:0.05",
        "--json",
    )  # fmt: skip
    assert code == 0, out
    created = json.loads(out)
    assert created["deployment"] == "deployments/shifted"
    assert created["window"] == "600s"
    assert [r["name"] for r in created["rules"]] == ["input-drift", "errors"]
    assert created["rules"][0]["min_rows"] == "500"

    # The measurements come in on another scale (a unit change upstream).
    drifted = env.features * 1.6 + env.features.std(axis=0) * 0.5
    for start in range(0, len(drifted), 32):
        await env.predict("deployments/shifted", drifted[start : start + 32])
    report: dict = {}
    for _ in range(100):  # the captured batches are flushed every 200 ms
        code, out = await aimass("run", "shifted", "--json")
        assert code == 0, out
        report = json.loads(out)
        if int(report.get("rows", 0)) >= len(drifted):
            break
        await asyncio.sleep(0.3)
    assert int(report["rows"]) == len(drifted)
    firing = {r["rule"]: r.get("firing", False) for r in report["rules"]}
    assert firing == {"input-drift": True, "errors": False}

    code, out = await aimass("alerts", "shifted", "--json")
    assert code == 0
    (alert,) = json.loads(out)["alerts"]
    assert alert["rule"] == "input-drift"
    assert alert["value"] > 0.25
    code, out = await aimass("alerts", "--json")  # every monitor's
    assert code == 0
    assert [a["name"] for a in json.loads(out)["alerts"]] == [alert["name"]]
    code, out = await aimass("alerts")
    assert code == 0
    assert "threshold" in out
    code, out = await aimass("show", "shifted", "--json")
    assert code == 0
    assert json.loads(out)["firing_rules"] == ["input-drift"]
    code, out = await aimass("show", "shifted")  # with the last report's tables
    assert code == 0
    assert "features (worst" in out
    assert np.isfinite(float(report["prediction_psi"]))

    code, out = await aimass("pause", "shifted", "--json")
    assert (code, json.loads(out)["paused"]) == (0, True)
    code, out = await aimass("list", "--deployment", "shifted", "--json")
    assert [m["name"] for m in json.loads(out)["monitors"]] == ["monitors/shifted"]
    code, out = await aimass("delete", "shifted")
    assert (code, out.strip()) == (0, "deleted monitors/shifted")
    code, out = await aimass("show", "shifted")
    assert code == 1
    assert "NOT_FOUND" in out
