"""``aimass schedule ...`` against a running pipeline service (the CLI runs in a worker
thread, so the service keeps serving on the test's event loop)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from typer.testing import CliRunner

from aimass.cli.main import app
from tests.fixtures.stack import serve_stack
from tests.pipeline.conftest import pipeline_settings

PIPELINE_YAML = """\
dataset:
  name: cancer
  data_path: breast_cancer.csv
  label_column: target
model:
  name: cancer-mlp
  task: classification
  mlp: {hidden_sizes: [16]}
"""


async def test_schedule_cli(tmp_path: Path, nats_url: str) -> None:
    settings = pipeline_settings(tmp_path, nats_url)
    spec_file = tmp_path / "retrain.yaml"
    spec_file.write_text(PIPELINE_YAML)
    async with serve_stack(settings, ["pipeline"]) as stack:
        address = stack.address("pipeline")

        async def aimass(*args: str) -> tuple[int, str]:
            argv = ["schedule", *args, "--address", address]
            result = await asyncio.to_thread(CliRunner().invoke, app, argv)
            return result.exit_code, result.output

        create = ("create", str(spec_file), "--id", "nightly")
        code, out = await aimass(*create, "--cron", "0 25 * * *")
        assert code == 2, out
        assert "schedule.cron" in out
        code, out = await aimass("list", "--json")
        assert (code, json.loads(out)) == (0, {"schedules": []})

        code, out = await aimass(
            *create, "--cron", "0 3 * * *", "--time-zone", "Europe/Paris", "--json"
        )
        assert code == 0, out
        created = json.loads(out)
        assert (created["name"], created["state"]) == ("schedules/nightly", "SCHEDULE_STATE_ACTIVE")
        assert len(created["next_run_times"]) == 5
        # 03:00 in Paris is 01:00 or 02:00 UTC depending on the season.
        assert all(t[11:16] in {"01:00", "02:00"} for t in created["next_run_times"])
        code, out = await aimass("list")
        assert code == 0
        assert "ACTIVE" in out
        code, out = await aimass("list", "--json")
        assert [s["name"] for s in json.loads(out)["schedules"]] == ["schedules/nightly"]

        code, out = await aimass("pause", "nightly", "--json")
        assert code == 0
        assert json.loads(out)["state"] == "SCHEDULE_STATE_PAUSED"
        code, out = await aimass("show", "nightly")
        assert code == 0
        assert "PAUSED" in out
        code, out = await aimass("resume", "schedules/nightly", "--json")
        assert json.loads(out)["state"] == "SCHEDULE_STATE_ACTIVE"

        code, out = await aimass("delete", "nightly")
        assert (code, out.strip()) == (0, "deleted schedules/nightly")
        code, out = await aimass("show", "nightly")
        assert code == 1
        assert "NOT_FOUND" in out
