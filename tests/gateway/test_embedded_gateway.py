"""`aimass up` with access control on: the admin key is created on the first start (file
mode 0600, its path printed, the key itself never), the REST gateway is a component on
ports.gateway, and keys are managed with `aimass keys`."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.cli.test_stack import stack_env

CLI_TIMEOUT_S = 180


def _aimass(env, *args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "aimass.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    if check and done.returncode != 0:
        pytest.fail(
            f"aimass {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done


def _get(url: str, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"x-api-key": key} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_aimass_up_with_auth_creates_the_admin_key_and_serves_rest(tmp_path):
    home = tmp_path / "home"
    env, ports = stack_env(home)
    env["AIMASS_AUTH__ENABLED"] = "true"
    started = _aimass(env, "up", "--detach", "--timeout", "150")
    try:
        key_file = home / "credentials" / "admin.key"
        assert str(key_file) in started.stdout.replace("\n", "")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        admin_key = key_file.read_text().strip()
        assert admin_key.rsplit("_", 1)[1] not in started.stdout + started.stderr
        status = json.loads(_aimass(env, "status", "--json").stdout)
        gateway = [c for c in status["components"] if c["name"] == "gateway"]
        assert gateway
        assert gateway[0]["state"] == "SERVING"
        base = f"http://127.0.0.1:{ports['gateway']}"
        assert _get(f"{base}/v1/models")[0] == 401
        code, body = _get(f"{base}/v1/models", admin_key)
        assert code == 200, body
        created = _aimass(env, "keys", "create", "ci-viewer", "--role", "viewer", "--json")
        viewer = json.loads(created.stdout)["secret"]
        assert _get(f"{base}/v1/datasets", viewer)[0] == 200
        listed = json.loads(_aimass(env, "keys", "list", "--json").stdout)
        assert {"apiKeys/admin", "apiKeys/ci-viewer"} <= {k["name"] for k in listed}
        _aimass(env, "keys", "revoke", "ci-viewer")
        refused = _aimass(env, "keys", "create", "bad", "--role", "root", check=False)
        assert refused.returncode == 2
    finally:
        _aimass(env, "down", check=False)
