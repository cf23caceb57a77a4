"""Shared fixtures: one real Redis and one real S3 store per test session.

Where they come from:

* If a Docker engine answers, testcontainers runs ``redis:7`` (with the same
  AOF settings as the local server) and MinIO, the way CI on a Docker host
  would.
* Otherwise the throwaway servers of ``cefmp4.dev.localservers`` run as child
  processes: Debian's ``redis-server`` and SeaweedFS ``weed mini``, with data
  under pytest's session temp dir.

``CEFMP4_TEST_SERVERS=local`` or ``=docker`` forces a choice (``auto`` is the
default).  Missing infrastructure is an error, never a skip: a suite that
quietly skips its integration tests proves nothing.

Both backends enforce real S3 rules such as the 5 MiB minimum for non-last
multipart parts; ``test_localservers`` guards that.  Only the local Redis can
be killed and restarted in place (``RedisServer.kill()``/``start()``), so fault
tests that need that should ask for ``local_redis_server``.

Servers are started once per session because startup costs ~1 s (SeaweedFS)
to several seconds (containers).  Tests isolate themselves instead of
resetting shared state: a unique ``key_prefix`` for Redis keys (no FLUSHALL,
which would also hit anything else on that server) and a fresh, empty
``bucket`` per test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import pytest
from hypothesis import settings

from cefmp4.dev.localservers import (
    JuiceFSGateway,
    RedisServer,
    S3Endpoint,
    SeaweedS3,
    make_s3_client,
)
from cefmp4.domain.config import Config
from tests import mp4gen
from tests.harness import service_config
from tests.properties import QUICK, examples

Backend = Literal["local", "docker"]

# Fixtures that start (or need) a server or an external process: Redis,
# SeaweedFS/MinIO, the JuiceFS gateway, ffmpeg. A test that uses none of them,
# directly or through another fixture, is marked ``unit`` (``task test-unit``).
SERVER_FIXTURES = frozenset(
    {
        "servers_backend",
        "redis_server",
        "local_redis_server",
        "s3_endpoint",
        "_session_s3_client",
        "redis_url",
        "s3_client",
        "bucket",
        "make_config",
        "sources",
        "recordings",  # test_mp4meta's ffmpeg-made files
        "large_faststart",
        "juicefs",
    }
)
# Tests that need no such fixture but start a program themselves (found by
# watching subprocess.Popen during `pytest -m unit`): not unit either.
EXTERNAL_PROGRAM_TESTS = (
    "tests/test_alerts.py::",  # promtool
    "tests/test_config.py::test_python_dash_m_exits_2_on_bad_config",
    "tests/test_deploy_files.py::test_systemd_analyze_verify_accepts_the_unit",
    "tests/test_image.py::",  # podman-compose
    "tests/test_localservers.py::",  # redis-server
    "tests/test_metadata_doc.py::test_a_stderr_flood_neither_stalls_ffprobe_nor_is_kept",
    "tests/test_metadata_doc.py::test_endless_ffprobe_output_is_cut_at_the_cap",
    "tests/test_secrets.py::test_help_prints_no_secret",  # the cefmp4 CLI
    "tests/test_mp4meta.py::test_fragmented_and_other_codecs_are_left_to_ffprobe",  # ffmpeg
    "tests/bench/test_bench_parts.py::test_camera_writes_zero_sized_mdat_then_patches_it",
    "tests/bench/test_bench_parts.py::test_cpu_seconds_with_children_counts_reaped_children",
    # Waits out a wedged event loop in real time: a timing test, not a unit.
    "tests/test_http.py::test_healthz_fails_while_the_loop_is_wedged_and_recovers",
)

# Properties without an explicit count follow the same rule as tests.properties.
settings.register_profile("quick", max_examples=examples(100), database=None)
if QUICK:
    settings.load_profile("quick")

_BACKEND_ENV = "CEFMP4_TEST_SERVERS"
_REDIS_IMAGE = "redis:7"
_DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
_AOF_ARGS = ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``unit`` every test that needs no server fixture (SERVER_FIXTURES)
    and starts no program (EXTERNAL_PROGRAM_TESTS)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SERVER_FIXTURES or item.nodeid.startswith(EXTERNAL_PROGRAM_TESTS):
            continue
        if item.get_closest_marker("chaos") or item.get_closest_marker("image"):
            continue  # `-m unit` replaces addopts' -m, which leaves these out
        item.add_marker(pytest.mark.unit)


class RedisHandle(Protocol):
    """What every ``redis_server`` offers; the local one also has kill()/start()."""

    @property
    def url(self) -> str: ...


class _ContainerRedis:
    """A Redis in a container, reduced to what tests may rely on everywhere."""

    def __init__(self, url: str) -> None:
        self._url = url

    @property
    def url(self) -> str:
        return self._url


def _docker_engine_reachable() -> bool:
    """True if a Docker engine answers a ping within a couple of seconds."""
    # docker-py only looks at DOCKER_HOST or the default socket; checking for
    # them first skips its failing probe, which also leaks a socket.
    if "DOCKER_HOST" not in os.environ and not Path(_DEFAULT_DOCKER_SOCKET).exists():
        return False
    try:
        import docker
        import requests
        from docker.errors import DockerException
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
    except DockerException:
        return False  # no socket, no DOCKER_HOST, or no answer to the version probe
    try:
        return bool(client.ping())
    except (DockerException, requests.exceptions.RequestException, OSError):
        return False
    finally:
        client.close()


@pytest.fixture(scope="session")
def servers_backend() -> Backend:
    """Which kind of servers this session runs against (see module docstring)."""
    choice = os.environ.get(_BACKEND_ENV, "auto").strip().lower()
    if choice == "local":
        return "local"
    if choice == "docker":
        if not _docker_engine_reachable():
            pytest.fail(f"{_BACKEND_ENV}=docker but no Docker engine answers")
        return "docker"
    if choice != "auto":
        pytest.fail(f"{_BACKEND_ENV} must be auto, local or docker, not {choice!r}")
    return "docker" if _docker_engine_reachable() else "local"


@pytest.fixture(scope="session")
def redis_server(
    servers_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisHandle]:
    if servers_backend == "docker":
        # Recent testcontainers keep their modules under .community (the old
        # path still works but warns); older ones, which pyproject's floor
        # allows, only have the old path.
        try:
            from testcontainers.community.redis import RedisContainer
        except ImportError:
            from testcontainers.redis import RedisContainer

        container = RedisContainer(_REDIS_IMAGE).with_command(["redis-server", *_AOF_ARGS])
        with container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(container.port)
            yield _ContainerRedis(f"redis://{host}:{port}/0")
        return
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def local_redis_server(redis_server: RedisHandle) -> RedisServer:
    """The session Redis when it can be killed and restarted; fails otherwise."""
    if not isinstance(redis_server, RedisServer):
        pytest.fail(f"this test needs a local Redis it can kill; run with {_BACKEND_ENV}=local")
    return redis_server


@pytest.fixture(scope="session")
def s3_endpoint(
    servers_backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3Endpoint]:
    if servers_backend == "docker":
        try:
            from testcontainers.community.minio import MinioContainer
        except ImportError:
            from testcontainers.minio import MinioContainer

        with MinioContainer() as minio:
            config = minio.get_config()
            yield S3Endpoint(
                url=f"http://{config['endpoint']}",
                access_key=config["access_key"],
                secret_key=config["secret_key"],
                region="us-east-1",
            )
        return
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server.endpoint


@pytest.fixture(scope="session")
def _session_s3_client(s3_endpoint: S3Endpoint) -> Iterator[Any]:
    # boto3 clients are thread-safe and cost tens of milliseconds to build, so
    # one serves the whole session behind the function-scoped fixture.
    client = make_s3_client(s3_endpoint)
    yield client
    client.close()


@pytest.fixture
def redis_url(redis_server: RedisHandle) -> str:
    return redis_server.url


@pytest.fixture
def key_prefix() -> str:
    """Unique per test; put every Redis key (and stream name) under it."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def s3_client(_session_s3_client: Any) -> Any:
    """Synchronous boto3 S3 client for assertions (path-style, session endpoint)."""
    return _session_s3_client


@pytest.fixture
def bucket(s3_client: Any) -> str:
    """A new, empty bucket for this test.

    Buckets are left behind afterwards: the session's servers are thrown away
    with their data, and a failed test's objects stay inspectable until then.
    """
    name = f"test-{uuid.uuid4().hex[:24]}"  # lowercase, 3..63 chars, DNS-safe
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> mp4gen.Mp4Sources:
    """Real ffmpeg-made MP4s shared by the end-to-end tests."""
    return mp4gen.build_sources(tmp_path_factory.mktemp("mp4"))


@pytest.fixture(scope="session")
def large_faststart(sources: mp4gen.Mp4Sources, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The faststart version of ``sources.large`` (moov first, every byte shifted)."""
    return mp4gen.remux_faststart(sources.large, tmp_path_factory.mktemp("fs") / "large_fs.mp4")


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    """An empty WATCH_DIR for one test."""
    path = tmp_path / "watch"
    path.mkdir()
    return path


@pytest.fixture
def make_config(
    watch: Path, redis_url: str, key_prefix: str, bucket: str, s3_endpoint: S3Endpoint
) -> Callable[..., Config]:
    """``make_config(**overrides)``: the test Config (tests/harness.service_config)."""

    def make(**overrides: Any) -> Config:
        return service_config(watch, redis_url, key_prefix, bucket, s3_endpoint, **overrides)

    return make


@pytest.fixture(scope="session")
def juicefs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """The JuiceFS S3 gateway (the benchmarks' store): more lenient than S3 on
    part rules, verifies no checksum header, but checks signed payloads."""
    with JuiceFSGateway(tmp_path_factory.mktemp("juicefs")) as gateway:
        yield gateway.endpoint
