"""The container image, built and run: ``pytest -m image`` (``task image-test``).

Excluded from the default suite like ``chaos``: the first build takes a few
minutes (debootstrap, then apt-get of ffmpeg inside the build). See
``tests/imagebuild.py`` for how it is built with podman and no registry.

The service runs in the image the way a deployment runs it (read-only root,
no capabilities, no-new-privileges, the watch dir mounted read-only) with
``--network host``, so it reaches the session's Redis and SeaweedFS on
127.0.0.1. The watch dir and the recording are readable by their group only
and the container gets that group with ``--group-add``: the recorders' group
story of docs/DEPLOY.md, checked rather than told. Missing tools fail the
test, never skip it: ``task image-test`` installs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML, installed with awscli (dev extra)

from cefmp4.dev.localservers import free_port
from cefmp4.domain.config import Config
from tests import imagebuild
from tests.harness import objects
from tests.mp4gen import Mp4Sources
from tests.test_deploy_files import compose

pytestmark = pytest.mark.image

IMAGE = "localhost/cefmp4:image-test"
CONTAINER_WATCH_DIR = "/recordings"
# The recorders' group: owns the watch dir and the recording, which only it
# (and root) may read. Not the image's own GID 10001.
RECORDERS_GID = 10002
UPLOAD_TIMEOUT = 120.0
STOP_TIMEOUT_SECONDS = 30


@pytest.fixture(scope="module")
def podman() -> imagebuild.Podman:
    missing = imagebuild.missing_tools()
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `task image-test`, which installs them")
    return imagebuild.Podman(imagebuild.write_containers_conf(imagebuild.CACHE_DIR))


@pytest.fixture(scope="module")
def image(podman: imagebuild.Podman) -> str:
    base = imagebuild.ensure_base_image(podman)
    imagebuild.build_wheels()
    imagebuild.build_image(podman, base, IMAGE)
    return IMAGE


def container_env(config: Config) -> str:
    """The service's Config as an env file (secrets stay off the command line)."""
    raw = msgspec.to_builtins(config, enc_hook=str)
    lines = [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
             for k, v in raw.items() if v is not None]  # fmt: skip
    return "\n".join(lines) + "\n"


def drop_group_readable(source: Path, dest: Path, gid: int) -> bytes:
    """Write ``source`` to ``dest`` as root:gid 0640 from its first byte on."""
    data = source.read_bytes()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchown(fd, 0, gid)
        os.fchmod(fd, 0o640)
        os.write(fd, data)
    finally:
        os.close(fd)
    return data


def until(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what()}")
        time.sleep(0.2)


@pytest.fixture
def service(
    podman: imagebuild.Podman,
    image: str,
    make_config: Callable[..., Config],
    watch: Path,
    tmp_path: Path,
) -> Iterator[tuple[str, Config]]:
    """The service running in the image; the container's name and its Config."""
    watch.chmod(0o750)
    os.chown(watch, 0, RECORDERS_GID)
    # The service sees the watch dir where it is mounted (events carry that path).
    config = msgspec.structs.replace(
        make_config(prom_port=free_port()), watch_dir=CONTAINER_WATCH_DIR
    )
    env_file = tmp_path / "cefmp4.env"
    env_file.write_text(container_env(config))
    name = f"cefmp4-image-test-{uuid.uuid4().hex[:8]}"
    podman.run(
        "run", "--detach", "--name", name, "--network", "host", "--read-only",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--group-add", str(RECORDERS_GID), "--env-file", str(env_file),
        "--volume", f"{watch}:{CONTAINER_WATCH_DIR}:ro", image,
    )  # fmt: skip
    try:
        yield name, config
    finally:
        podman.run("rm", "--force", "--time", "0", name, check=False)


def test_image_uploads_unprivileged_is_healthy_and_stops_on_sigterm(
    podman: imagebuild.Podman,
    service: tuple[str, Config],
    watch: Path,
    sources: Mp4Sources,
    s3_client: Any,
    bucket: str,
) -> None:
    name, config = service

    def logs() -> str:
        done = podman.run("logs", name, check=False)
        return (done.stdout + done.stderr)[-6000:]

    # Liveness first: the HEALTHCHECK the image declares, run by the engine.
    healthcheck = json.loads(
        podman.run("image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGE).stdout
    )
    assert healthcheck["Test"][0] == "CMD" and "/healthz" in " ".join(healthcheck["Test"])
    until(
        lambda: podman.run("healthcheck", "run", name, check=False).returncode == 0,
        60,
        lambda: f"healthcheck never passed:\n{logs()}",
    )

    uid = podman.run("exec", name, "id", "-u").stdout.strip()
    assert uid.isdigit() and int(uid) != 0, uid
    groups = podman.run("exec", name, "id", "-G").stdout.split()
    assert str(RECORDERS_GID) in groups, groups

    # A recording only the recorders' group may read goes up byte-exact,
    # with its sidecar (so ffprobe ran in the image).
    data = drop_group_readable(sources.large, watch / "cam1.mp4", RECORDERS_GID)
    recordings: dict[str, bytes] = {}

    def uploaded() -> bool:
        recordings.update(objects(s3_client, bucket))
        keys = list(recordings)
        return any(k.endswith(".mp4") for k in keys) and any(
            k.endswith(".metadata.json") for k in keys
        )

    until(uploaded, UPLOAD_TIMEOUT, lambda: f"objects {sorted(recordings)}:\n{logs()}")
    [key] = [k for k in recordings if k.endswith("/cam1.mp4")]
    assert key.startswith(config.s3_key_prefix)
    assert recordings[key] == data
    sidecar = json.loads(recordings[f"{key}.metadata.json"])
    assert sidecar["original_file_path"] == f"{CONTAINER_WATCH_DIR}/cam1.mp4"
    assert sidecar["sha256"] in (None, hashlib.sha256(data).hexdigest())
    assert sidecar["checksum"] is not None or sidecar["sha256"] is not None
    assert sidecar["ffprobe_error"] is None and sidecar["streams"], sidecar

    # SIGTERM to PID 1: the service finishes and exits 0 within the timeout
    # (podman would SIGKILL after it: exit code 137).
    podman.run("stop", "--time", str(STOP_TIMEOUT_SECONDS), name, timeout=STOP_TIMEOUT_SECONDS + 30)
    state = podman.run("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    assert state == "0", f"exit code {state}:\n{logs()}"


def podman_compose() -> str:
    """The venv's podman-compose (``task image-test`` installs it), else PATH's."""
    beside = Path(sys.executable).with_name("podman-compose")
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    if found is None:
        pytest.fail("podman-compose missing: run `task image-test`, which installs it")
    return found


def test_compose_file_is_what_podman_compose_reads() -> None:
    """``podman-compose config``: the file parses, interpolates and resolves."""
    done = subprocess.run(
        [podman_compose(), "-f", str(imagebuild.REPO / "deploy" / "docker-compose.yml"), "config"],
        env={**os.environ, "RECORDINGS_GID": "4242"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == set(compose()["services"])
    cefmp4 = resolved["services"]["cefmp4"]
    assert [str(g) for g in cefmp4["group_add"]] == ["4242"]
    assert cefmp4["build"]["context"] == str(imagebuild.REPO)
