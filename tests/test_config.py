"""Configuration parsing (``cefmp4.adapters.environment.load``) and the CLI's exit code 2.

A service that starts with a wrong value (a 1-byte part size, a typo in a
boolean) fails much later and far from the cause; these tests pin that bad
values are refused up front, with the variable's name first in the message.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cefmp4 import cli
from cefmp4.adapters import environment
from cefmp4.adapters.environment import load
from cefmp4.domain.config import Config, is_host
from cefmp4.domain.errors import ConfigError
from cefmp4.domain.partplan import MIN_PART_SIZE, PartPlan

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No configuration from the developer's shell or checkout: only what the test sets."""
    for field in msgspec.structs.fields(Config):
        monkeypatch.delenv(field.encode_name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray ./.env
    return monkeypatch


def write_env(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = load({}, env_file=None)
    assert config == Config()
    # The seed's documented defaults; changing one is a visible behaviour change.
    assert config.watch_dir == "./local_watch_dir"
    assert config.chunk_size_bytes == 10 * MiB
    assert config.stream_timeout_seconds == 30.0
    assert config.settle_seconds == 1.0
    assert config.watch_poll is False
    assert config.s3_bucket_name == "video-streams"
    assert config.s3_key_prefix == "streams/"
    assert config.s3_endpoint_url is None
    assert config.redis_key_prefix == "cefmp4"
    assert config.events_key == "cefmp4:events"
    assert config.log_level == "INFO"
    assert config.max_concurrent_streams == 4


def test_missing_env_file_is_not_an_error(tmp_path: Path) -> None:
    assert load({}, env_file=tmp_path / "nope.env") == Config()


def test_environment_values_are_parsed() -> None:
    config = load(
        {
            "CHUNK_SIZE_BYTES": str(8 * MiB),
            "STREAM_TIMEOUT_SECONDS": "2.5",
            "WATCH_POLL": "true",
            "LOG_LEVEL": "debug",  # case-insensitive, as operators type it
            "S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        },
        env_file=None,
    )
    assert config.chunk_size_bytes == 8 * MiB
    assert config.stream_timeout_seconds == 2.5
    assert config.watch_poll is True
    assert config.log_level == "DEBUG"
    assert config.s3_endpoint_url == "http://127.0.0.1:9000"


def test_unrelated_environment_is_ignored() -> None:
    # The real environment is full of PATH, HOME, ...; they must not trip
    # validation or leak into the config.
    assert load({"PATH": "/bin", "HOME": "/root", "chunk_size_bytes": "1"}, None) == Config()


def test_env_file_is_read(tmp_path: Path) -> None:
    env_file = write_env(tmp_path, "S3_BUCKET_NAME=from-file\nSETTLE_SECONDS=3\n")
    config = load({}, env_file=env_file)
    assert config.s3_bucket_name == "from-file"
    assert config.settle_seconds == 3.0


def test_environment_overrides_env_file(tmp_path: Path) -> None:
    env_file = write_env(
        tmp_path, f"CHUNK_SIZE_BYTES={6 * MiB}\nS3_BUCKET_NAME=from-file\nLOG_LEVEL=warning\n"
    )
    config = load({"CHUNK_SIZE_BYTES": str(7 * MiB), "LOG_LEVEL": "error"}, env_file=env_file)
    assert config.chunk_size_bytes == 7 * MiB  # environment wins
    assert config.log_level == "ERROR"
    assert config.s3_bucket_name == "from-file"  # file fills what the environment lacks


def test_environment_rescues_a_bad_env_file_value(tmp_path: Path) -> None:
    # Overriding is by value, before validation: the file's bad value is never checked.
    env_file = write_env(tmp_path, "CHUNK_SIZE_BYTES=1\n")
    assert load({"CHUNK_SIZE_BYTES": str(6 * MiB)}, env_file).chunk_size_bytes == 6 * MiB


def test_empty_string_means_unset(tmp_path: Path) -> None:
    # Compose files and CI templates produce FOO= for "not given"; that must
    # fall back to the default, not fail ("" is not an int) or set an empty name.
    config = load(
        {"CHUNK_SIZE_BYTES": "", "S3_ENDPOINT_URL": "", "WATCH_POLL": "", "LOG_LEVEL": ""},
        env_file=None,
    )
    assert config == Config()
    env_file = write_env(tmp_path, "REDIS_KEY_PREFIX=\nS3_BUCKET_NAME=\n")
    assert load({}, env_file) == Config()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHUNK_SIZE_BYTES", str(MIN_PART_SIZE - 1)),  # S3 rejects parts below 5 MiB
        ("CHUNK_SIZE_BYTES", "1"),
        ("CHUNK_SIZE_BYTES", "ten"),
        ("FIRST_PART_BYTES", str(MIN_PART_SIZE - 1)),
        ("LARGE_PART_BYTES", str(MIN_PART_SIZE - 1)),
        ("WATCH_POLL", "maybe"),
        ("LOG_LEVEL", "loud"),
        ("MAX_CONCURRENT_STREAMS", "0"),
        ("STREAM_TIMEOUT_SECONDS", "abc"),
        ("STREAM_TIMEOUT_SECONDS", "0"),
        ("PROM_PORT", "70000"),
        ("APP_ENV", "staging"),
    ],
)
def test_bad_values_raise_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load({name: value}, env_file=None)
    message = str(raised.value)
    # The operator has to know which variable to fix: its name comes first.
    assert message.startswith(name), message
    assert "\n" not in message


def test_bad_value_in_env_file_is_reported_too(tmp_path: Path) -> None:
    env_file = write_env(tmp_path, "MAX_CONCURRENT_STREAMS=0\n")
    with pytest.raises(ConfigError, match=r"^MAX_CONCURRENT_STREAMS"):
        load({}, env_file)


def test_the_part_plan_settings() -> None:
    config = load({"FIRST_PART_BYTES": str(6 * MiB), "LARGE_PART_BYTES": str(64 * MiB)}, None)
    assert config.plan_at_sight(0) == PartPlan(6 * MiB, 10 * MiB)
    assert config.plan_at_sight(4096 * MiB) == PartPlan(6 * MiB, 64 * MiB)
    assert Config().plan_at_sight(0) == PartPlan(5 * MiB, 10 * MiB)  # the defaults
    assert Config().unrecorded_plan == PartPlan(10 * MiB, 10 * MiB)


def test_minimum_chunk_size_is_accepted() -> None:
    # Guards the boundary: exactly 5 MiB is S3's minimum and must be allowed.
    assert load({"CHUNK_SIZE_BYTES": str(MIN_PART_SIZE)}, None).chunk_size_bytes == MIN_PART_SIZE


@pytest.mark.parametrize(
    ("name", "value"),
    [("CHUNK_SIZE_BYTES", "1"), ("LOG_LEVEL", "loud"), ("MAX_CONCURRENT_STREAMS", "0")],
)
def test_cli_exits_2_with_one_line_naming_the_variable(
    name: str, value: str, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv(name, value)
    assert cli.main(["run"]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert name in lines[0]
    assert out == ""


def test_cli_reads_env_file_from_working_directory(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `cefmp4 run` reads ./.env: a bad value there is caught the same way.
    write_env(tmp_path, "WATCH_POLL=maybe\n")
    assert cli.main(["run"]) == 2
    assert "WATCH_POLL" in capsys.readouterr().err


def test_python_dash_m_exits_2_on_bad_config(tmp_path: Path) -> None:
    # The real entry point, as systemd or a container runs it: the exit code is
    # what a supervisor uses to stop restarting a misconfigured service.
    names = {f.encode_name for f in msgspec.structs.fields(Config)}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["CHUNK_SIZE_BYTES"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "cefmp4", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "CHUNK_SIZE_BYTES" in result.stderr
    assert "Traceback" not in result.stderr


def test_settle_longer_than_timeout_is_refused() -> None:
    # The idle timeout would always fire first and the MP4 check never decide.
    with pytest.raises(ConfigError, match=r"^SETTLE_SECONDS .* STREAM_TIMEOUT_SECONDS"):
        load({"SETTLE_SECONDS": "40", "STREAM_TIMEOUT_SECONDS": "30"}, None)


@pytest.mark.parametrize(
    ("archive", "recordings"),
    [("streams/", "streams/"), ("streams/events/", "streams/"), ("arch", "archive/")],
)
def test_event_archive_prefix_must_not_overlap_recordings(archive: str, recordings: str) -> None:
    # The archive's listing would return recordings (or gc would see segments).
    with pytest.raises(ConfigError, match=r"^EVENT_ARCHIVE_PREFIX .* S3_KEY_PREFIX"):
        load({"EVENT_ARCHIVE_PREFIX": archive, "S3_KEY_PREFIX": recordings}, None)
    # An empty prefix (only possible in code: empty env values mean "unset")
    # is a prefix of everything.
    with pytest.raises(ValueError, match=r"^EVENT_ARCHIVE_PREFIX"):
        Config(event_archive_prefix="")


def test_event_archive_prefix_default_and_override() -> None:
    assert load({}, None).event_archive_prefix == "cefmp4-events/"
    config = load({"EVENT_ARCHIVE_PREFIX": "audit/", "S3_KEY_PREFIX": "audit-streams/"}, None)
    assert (config.event_archive_prefix, config.s3_key_prefix) == ("audit/", "audit-streams/")


def test_bool_error_says_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match=r"^WATCH_POLL: .*true, false, 1, 0"):
        load({"WATCH_POLL": "maybe"}, None)


def test_metrics_addr_defaults_to_loopback() -> None:
    # `cefmp4 run` on a host publishes nothing unless told to (the image does).
    assert load({}, env_file=None).metrics_addr == "127.0.0.1"


@pytest.mark.parametrize(
    "value", ["0.0.0.0", "127.0.0.1", "::", "::1", "fe80::1", "localhost", "metrics.internal."]
)
def test_metrics_addr_accepts_addresses_and_hostnames(value: str) -> None:
    assert load({"METRICS_ADDR": value}, env_file=None).metrics_addr == value


@pytest.mark.parametrize(
    "value", ["http://0.0.0.0", "127.0.0.1:8000", "a b", "-host", "host-", "a..b", "x" * 64]
)
def test_metrics_addr_refuses_what_is_no_bind_address(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^METRICS_ADDR: "):
        load({"METRICS_ADDR": value}, env_file=None)


@given(st.ip_addresses())
def test_every_ip_address_is_a_host(address: IPv4Address | IPv6Address) -> None:
    assert is_host(str(address))


def test_a_replica_is_named_after_this_process_unless_given() -> None:
    named = environment.named_replica(Config())
    assert named.replica == f"{platform.node()}-{os.getpid()}"
    given = Config(replica_id="nvr-1")
    assert environment.named_replica(given) is given
