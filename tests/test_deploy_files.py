"""deploy/ read as an operator's tools read it, in milliseconds.

The image itself is built and run by ``tests/test_image.py`` (``-m image``);
these checks are the default suite's: the compose file (PyYAML, what compose
itself parses it with), the Dockerfile's base and HEALTHCHECK, the
.dockerignore (Docker's rules: last matching pattern wins), the systemd unit
(``systemd-analyze verify`` where systemd is installed, and its directives
always) and the example environment file (through ``cefmp4.adapters.environment.load``,
the service's own parser).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML, installed with awscli (dev extra)

from cefmp4.adapters import environment
from cefmp4.domain import config as config_module
from cefmp4.domain.durations import duration
from tests.test_exposure import instructions

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "cefmp4.service"
ENV_EXAMPLE = DEPLOY / "cefmp4.env.example"


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def dockerfile_healthcheck() -> list[str]:
    """The HEALTHCHECK's exec-form command, as compose spells ``test``."""
    [arg] = [
        a for op, a in instructions((DEPLOY / "Dockerfile").read_text()) if op == "HEALTHCHECK"
    ]
    _options, _, command = arg.partition(" CMD ")
    argv = json.loads(command)
    assert isinstance(argv, list)
    return ["CMD", *argv]


def seconds(text: str) -> float:
    """A systemd or compose time span without spaces (``40s``, ``1min``, ``40``)."""
    text = text.replace("min", "m")
    return float(text) if text.isdigit() else duration(text).total_seconds()


# --- compose ---


def test_compose_services_all_have_healthchecks() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "minio", "cefmp4"}
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, name


def test_compose_cefmp4_healthcheck_is_the_images() -> None:
    assert compose()["services"]["cefmp4"]["healthcheck"]["test"] == dockerfile_healthcheck()


def test_compose_redis_keeps_the_log() -> None:
    command = compose()["services"]["redis"]["command"]
    pairs = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert pairs["--appendonly"] == "yes"
    assert pairs["--maxmemory-policy"] == "noeviction"


def pinned(image: str) -> bool:
    """A tag that names one release, or a digest: never ``latest`` or a bare major."""
    if "@sha256:" in image:
        return True
    _, _, tag = image.rpartition(":")
    if "/" in tag or not tag or tag == image:
        return False
    return bool(re.fullmatch(r"\d+\.\d+\.\d+([-.][\w.-]+)?|RELEASE\.[\dT:-]+Z", tag))


@pytest.mark.parametrize(
    ("image", "expected"),
    [("redis:7.2.5", True), ("redis:7", False), ("redis", False), ("redis:latest", False),
     ("minio/minio:RELEASE.2024-12-18T13-15-44Z", True), ("minio/minio", False),
     ("localhost:5000/redis", False), ("redis@sha256:" + "0" * 64, True)],
)  # fmt: skip
def test_pinned_tells_releases_from_moving_tags(image: str, expected: bool) -> None:
    assert pinned(image) is expected


def test_compose_images_are_pinned() -> None:
    images = [s["image"] for s in compose()["services"].values() if "image" in s]
    assert images and all(pinned(i) for i in images), images


def test_compose_cefmp4_service_stops_cleanly_and_reads_only() -> None:
    service = compose()["services"]["cefmp4"]
    env = service["environment"]
    assert env["METRICS_ADDR"] == "0.0.0.0"
    assert service["group_add"], "the recorders' group example is gone"
    grace = float(env.get("SHUTDOWN_GRACE_SECONDS", config_module.Config().shutdown_grace_seconds))
    assert seconds(service["stop_grace_period"]) > grace
    assert service["read_only"] is True
    assert all(v.endswith(":ro") for v in service["volumes"]), service["volumes"]


# --- Dockerfile and .dockerignore ---


def test_dockerfile_base_is_an_argument_defaulting_to_python_slim() -> None:
    steps = instructions((DEPLOY / "Dockerfile").read_text())
    assert ("ARG", "BASE=python:3.11-slim") in steps
    assert all(arg.split()[0] == "${BASE}" for op, arg in steps if op == "FROM")
    installs = [arg for op, arg in steps if op == "RUN" and "pip install" in arg]
    assert installs and all("--no-index" in arg for arg in installs), installs


def test_dockerfile_healthcheck_asks_healthz_on_prom_port() -> None:
    command = " ".join(dockerfile_healthcheck())
    assert "/healthz" in command and "PROM_PORT" in command


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for ``path``: the last matching pattern wins.

    A pattern matches the path or any of its parent directories (so ``build``
    excludes everything under build/), ``!`` re-includes, ``*`` and ``?`` stay
    within one path segment, ``**/`` is any number of directories.
    """
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = glob_regex(raw.removeprefix("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            verdict = not negate
    return verdict


def glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out.append(
            {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        )
    return re.compile("".join(out))


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", ".cefmp4/redis/appendonly.aof", ".env",
     "local_watch_dir/cam1.mp4", "cefmp4/__pycache__/cli.cpython-311.pyc", ".mypy_cache/x",
     "build/lib/cefmp4/cli.py", "build/image-constraints.txt"],
)  # fmt: skip
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert ignored(path, dockerignore())


@pytest.mark.parametrize(
    "path", ["build/wheels/cefmp4-0.1.0-py3-none-any.whl", "deploy/Dockerfile", "pyproject.toml"]
)
def test_dockerignore_keeps_what_the_build_needs(path: str) -> None:
    assert not ignored(path, dockerignore())


# --- systemd unit and its environment file ---


def directives(unit: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values in order, as systemd reads a unit (keys may repeat)."""
    found: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in unit.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        found.setdefault((section, key.strip()), []).append(value.strip())
    return found


def env_example() -> dict[str, str]:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if line and line[0] != "#"]
    return dict(line.split("=", 1) for line in lines)


def test_env_example_is_a_valid_config_of_known_variables() -> None:
    names = {f.encode_name for f in msgspec.structs.fields(config_module.Config)}
    assert set(env_example()) <= names, set(env_example()) - names
    config = environment.load({}, env_file=ENV_EXAMPLE)
    assert config.app_env == "production"


def test_systemd_unit_runs_unprivileged_hardened_and_outlasts_the_grace() -> None:
    unit = directives(UNIT.read_text())
    service = {key: values[-1] for (section, key), values in unit.items() if section == "Service"}
    assert service["User"] == "cefmp4"
    assert service["EnvironmentFile"] == "/etc/cefmp4.env"
    assert service["ExecStart"] == "/opt/cefmp4/bin/cefmp4 run"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    config = environment.load({}, env_file=ENV_EXAMPLE)
    assert seconds(service["TimeoutStopSec"]) > config.shutdown_grace_seconds
    # The one place it reads, read-only, is the example's WATCH_DIR.
    assert config.watch_dir in service["ReadOnlyPaths"].split()


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed; the directives test still ran")
    # verify checks that ExecStart exists, so it runs in a root holding the
    # unit, a stand-in /opt/cefmp4/bin/cefmp4 and this machine's systemd units.
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    executable = root / "opt/cefmp4/bin/cefmp4"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/systemd").symlink_to("/usr/lib/systemd")
    done = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", UNIT.name],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # verify exits 0 on unknown keys and bad values (it only warns), so its
    # complaints about this unit are what counts; the host's own units'
    # symlinks can be reported unresolvable under --root and are not ours.
    about_unit = [line for line in done.stderr.splitlines() if UNIT.name in line]
    assert done.returncode == 0 and not about_unit, done.stderr
