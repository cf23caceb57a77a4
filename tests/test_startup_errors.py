"""Start-up errors: ``cefmp4 run`` prints one line and exits 2, no traceback.

Each case runs ``python -m cefmp4 run`` as a child process with one thing
wrong in its environment: an invalid value, Redis unreachable past
``REDIS_START_TIMEOUT_SECONDS``, no S3 credentials anywhere, a bucket that is
missing and cannot be created. ``LOG_LEVEL=ERROR`` keeps the service's own
info lines out of stderr, so the line is the only one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cefmp4.dev.localservers import free_port
from cefmp4.domain.config import Config
from tests.harness import PYTHON, subprocess_env


def run(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "cefmp4", "run"],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def environment(config: Config, tmp_path: Path, **changes: str | None) -> dict[str, str]:
    env = subprocess_env(config)
    env["LOG_LEVEL"] = "ERROR"
    # No credential source outside the test's control: no ~/.aws, no
    # instance metadata (which would also be a request off this machine).
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env |= {
        "HOME": str(home),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(home / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"),
    }
    for name in [n for n in env if n.startswith("AWS_") and "FILE" not in n]:
        if name not in ("AWS_EC2_METADATA_DISABLED",):
            del env[name]
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def assert_one_line(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def config(make_config: Any) -> Config:
    c: Config = make_config()
    return c


def test_bad_configuration(config: Config, tmp_path: Path) -> None:
    result = run(environment(config, tmp_path, CHUNK_SIZE_BYTES="12"), tmp_path)
    assert_one_line(result, "invalid configuration", "CHUNK_SIZE_BYTES")


def test_redis_unreachable_at_start(config: Config, tmp_path: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    env = environment(config, tmp_path, REDIS_URL=url, REDIS_START_TIMEOUT_SECONDS="1")
    line = assert_one_line(run(env, tmp_path), "cannot start", "cannot reach Redis",
                           "REDIS_START_TIMEOUT_SECONDS")  # fmt: skip
    assert "hunter2" not in line


def test_no_s3_credentials(config: Config, tmp_path: Path) -> None:
    env = environment(config, tmp_path, S3_ACCESS_KEY_ID=None, S3_SECRET_ACCESS_KEY=None)
    assert_one_line(run(env, tmp_path), "cannot start", "no S3 credentials")


def test_bucket_missing_and_not_creatable(config: Config, tmp_path: Path) -> None:
    # SeaweedFS (like S3) answers HEAD with 404 and refuses to create the name.
    bad = msgspec.structs.replace(config, s3_bucket_name="Not_A_Valid_Bucket")
    line = assert_one_line(run(environment(bad, tmp_path), tmp_path), "cannot start",
                           "Not_A_Valid_Bucket", "cannot be created")  # fmt: skip
    assert config.s3_secret_access_key not in line  # type: ignore[operator]
