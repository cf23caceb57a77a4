"""The benchmarks' own logic: argument types, ratios, the camera writer, CPU accounting.

No figures here (benchmarks measure; tests check that what they measure is
what they say).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.bench.bench_cameras import Camera, _placeholder
from tests.bench.bench_latency import _kinds
from tests.bench.bench_throughput import _peer_list, _ratios, parse_args
from tests.bench.common import cpu_seconds, env_pair, known_env_names
from tests.mp4gen import make_mp4


def test_env_pair_splits_on_the_first_equals() -> None:
    assert env_pair("S3_CHECKSUM=none") == ("S3_CHECKSUM", "none")
    assert env_pair("A=b=c") == ("A", "b=c")
    assert env_pair("EMPTY=") == ("EMPTY", "")
    for bad in ("NOEQUALS", "=value", " A=1"):
        with pytest.raises(ValueError):
            env_pair(bad)


def test_known_env_names_are_the_config_variables() -> None:
    names = known_env_names()
    assert {"CHUNK_SIZE_BYTES", "SETTLE_SECONDS", "PART_CONCURRENCY"} <= names
    assert "NOT_A_SETTING" not in names


def test_list_arguments_reject_unknown_names() -> None:
    assert _peer_list("aws, rclone") == ["aws", "rclone"]
    assert _peer_list("") == []
    with pytest.raises(ValueError):
        _peer_list("aws,curl")
    assert _kinds("fragmented") == ["fragmented"]
    with pytest.raises(ValueError):
        _kinds("faststart")


def test_ceiling_env_defaults_only_when_none_is_given() -> None:
    assert parse_args([]).ceiling_env == [("S3_CHECKSUM", "none"), ("SIDECAR_SHA256", "false")]
    assert parse_args(["--ceiling-env", "X=1"]).ceiling_env == [("X", "1")]
    assert parse_args(["--service-env", "A=1", "--service-env", "B=2"]).service_env == [
        ("A", "1"),
        ("B", "2"),
    ]


def _run(mib_per_s: float, cpu: float, **extra: Any) -> dict[str, Any]:
    return {"mib_per_s": mib_per_s, "cpu_seconds_per_gib": cpu, **extra}


def test_ratios_compare_with_the_fastest_peer_and_with_aws_cpu() -> None:
    service = _run(120.0, 2.0, peak_rss_mib=150.0, parts_in_flight_bound_mib={"one_stream": 40})
    peers = {
        "aws": _run(50.0, 10.0, mib_per_s_excluding_startup=60.0),
        "s5cmd": _run(100.0, 3.0, mib_per_s_excluding_startup=110.0),
        "rclone": _run(80.0, 4.0, mib_per_s_excluding_startup=90.0),
    }
    q = _ratios(service, _run(240.0, 1.0), peers)
    assert q["best_peer"] == "s5cmd"
    assert q["speed_vs_best_peer"] == 1.2 and q["speed_met"]
    assert q["speed_vs_best_peer_excluding_its_startup"] == round(120 / 110, 2)
    assert q["cpu_vs_aws"] == 0.2 and q["cpu_met"]
    assert q["rss_limit_mib"] == 140 and not q["rss_met"]
    assert q["speed_vs_ceiling"] == 0.5 and q["cpu_vs_ceiling"] == 2.0
    slow = _ratios({**service, "mib_per_s": 119.0, "cpu_seconds_per_gib": 5.1}, None, peers)
    assert not slow["speed_met"] and not slow["cpu_met"]
    assert "speed_vs_ceiling" not in slow
    alone = _ratios(service, None, {})
    assert "speed_vs_best_peer" not in alone and "cpu_vs_aws" not in alone


def test_camera_writes_zero_sized_mdat_then_patches_it(tmp_path: Path) -> None:
    source = make_mp4(tmp_path / "src.mp4", seconds=1)
    data, patches = _placeholder(source)
    assert data != source.read_bytes() and len(data) == source.stat().st_size
    cam = Camera(
        tmp_path / "cam.mp4",
        data,
        patches,
        start_at=time.monotonic(),
        seconds=0.3,
        ticks_per_second=20,
    )
    cam.start()
    cam.join(timeout=10)
    assert cam.error is None and cam.closed_at is not None
    assert (tmp_path / "cam.mp4").read_bytes() == source.read_bytes()


def test_cpu_seconds_with_children_counts_reaped_children() -> None:
    before = cpu_seconds(os.getpid(), children=True)
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert cpu_seconds(os.getpid(), children=True) - before >= 0.25
