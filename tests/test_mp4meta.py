"""Metadata from the MP4 boxes (``cefmp4.domain.mp4meta``) equals ffprobe's.

The sidecar's duration, container and streams come from the boxes when they
can (``METADATA_PROBE=auto``), so for every file the boxes describe, the
description must be exactly what ``summarize`` makes of ffprobe's output on
the same file; files they cannot describe must say so, never guess. Real
ffmpeg-made recordings, the installed ffprobe; the parser is also fed
arbitrary and mutated bytes (it must never raise).
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cefmp4.adapters import mp4files
from cefmp4.domain import mp4meta
from cefmp4.domain.config import Config
from consumers.deps import Deps
from consumers.metadata import MetadataWriter, Probe, summarize
from tests.mp4gen import ffmpeg_path, make_mp4, remux_faststart
from tests.properties import examples

_SINE = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate={rate}"]


def _encode(dst: Path, *, size: str, fps: int, seconds: float, audio: str | None,
            pix_fmt: str = "yuv420p", vcodec: str = "libx264") -> Path:  # fmt: skip
    args = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}"]
    if audio is not None:
        rate, channels = audio.split("/")
        args += [a.format(rate=rate) for a in _SINE]
        args += ["-map", "0:v", "-map", "1:a", "-c:a", "aac", "-ac", channels]
    args += ["-t", f"{seconds}", "-c:v", vcodec, "-pix_fmt", pix_fmt, str(dst)]
    subprocess.run(
        [ffmpeg_path(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return dst


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mp4meta")
    regular = make_mp4(root / "regular.mp4", seconds=2)
    return {
        "regular": regular,
        "faststart": remux_faststart(regular, root / "faststart.mp4"),
        "short_mono_48k": make_mp4(root / "short.mp4", seconds=1),
        "30fps_stereo_44k_odd_length": _encode(
            root / "b.mp4", size="640x360", fps=30, seconds=2.37, audio="44100/2"
        ),
        "cropped_no_audio": _encode(
            root / "d.mp4", size="322x242", fps=24, seconds=1.5, audio=None
        ),
        "full_range": _encode(
            root / "e.mp4", size="320x240", fps=25, seconds=1, audio=None, pix_fmt="yuvj420p"
        ),
    }


def _ffprobe(path: Path) -> Probe:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
         str(path)],
        check=True, capture_output=True, timeout=60,
    ).stdout  # fmt: skip
    return summarize(out)


@pytest.mark.parametrize(
    "name",
    ["regular", "faststart", "short_mono_48k", "30fps_stereo_44k_odd_length",
     "cropped_no_audio", "full_range"],
)  # fmt: skip
def test_boxes_describe_a_recording_exactly_as_ffprobe(
    recordings: dict[str, Path], name: str
) -> None:
    path = recordings[name]
    described = mp4files.describe_file(path)
    assert isinstance(described, mp4meta.BoxDescription), described
    probe = _ffprobe(path)
    assert probe.error is None
    assert described.duration_seconds == probe.duration_seconds
    assert described.container == probe.container
    assert described.streams == probe.streams
    # Same key order too: the sidecar's JSON reads the same either way.
    assert [list(s) for s in described.streams] == [list(s) for s in probe.streams]


def test_fragmented_and_other_codecs_are_left_to_ffprobe(tmp_path: Path) -> None:
    fragmented = make_mp4(tmp_path / "frag.mp4", seconds=2, fragmented=True)
    mpeg4 = _encode(tmp_path / "m4v.mp4", size="320x240", fps=25, seconds=1, audio=None,
                    vcodec="mpeg4")  # fmt: skip
    high10 = _encode(tmp_path / "h10.mp4", size="320x240", fps=25, seconds=1, audio=None,
                     pix_fmt="yuv420p10le")  # fmt: skip
    for path in (fragmented, mpeg4, high10):
        assert isinstance(mp4files.describe_file(path), mp4meta.Undescribed), path


def test_a_file_without_moov_is_undescribed(tmp_path: Path) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(struct.pack(">I4s", 16, b"ftyp") + b"isom\0\0\0\0")
    assert mp4files.describe_file(path) == mp4meta.Undescribed("no moov box")


def _moov_payload(path: Path) -> bytes:
    data = path.read_bytes()
    at = data.index(b"moov") - 4
    (size,) = struct.unpack_from(">I", data, at)
    return data[at + 8 : at + size]


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=512))
def test_describe_moov_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    result = mp4meta.describe_moov(data, 1000)
    assert isinstance(result, mp4meta.BoxDescription | mp4meta.Undescribed)


_REAL_MOOV: list[bytes] = []


@settings(max_examples=examples(300), deadline=None)
@given(st.data())
def test_describe_moov_never_raises_on_mutated_real_moov(
    recordings: dict[str, Path], data: st.DataObject
) -> None:
    if not _REAL_MOOV:
        _REAL_MOOV.append(_moov_payload(recordings["regular"]))
    moov = bytearray(_REAL_MOOV[0])
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(moov) - 1))
        moov[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(moov)))
    result = mp4meta.describe_moov(bytes(moov[:cut]), 1000)
    assert isinstance(result, mp4meta.BoxDescription | mp4meta.Undescribed)


def _writer(mode: str) -> MetadataWriter:
    # probe() reads only the config; a missing ffprobe shows whether it ran.
    config = Config(metadata_probe=mode, ffprobe_path="/nonexistent/ffprobe")  # type: ignore[arg-type]
    return MetadataWriter(cast(Deps, SimpleNamespace(config=config)))


def _probe(mode: str, path: Path, mp4: str = "complete") -> Probe:
    return asyncio.run(_writer(mode).probe(os.fsdecode(path), mp4))


def test_auto_describes_from_the_boxes_without_ffprobe(recordings: dict[str, Path]) -> None:
    probe = _probe("auto", recordings["regular"])
    assert probe.error is None
    expected: Any = _ffprobe(recordings["regular"])
    assert (probe.duration_seconds, probe.container, probe.streams, probe.streams_total) == (
        expected.duration_seconds, expected.container, expected.streams, expected.streams_total
    )  # fmt: skip


def test_auto_runs_ffprobe_for_what_the_boxes_do_not_settle(
    recordings: dict[str, Path], tmp_path: Path
) -> None:
    fragmented = make_mp4(tmp_path / "frag.mp4", seconds=2, fragmented=True)
    assert (_probe("auto", fragmented).error or "").startswith("cannot run ffprobe")
    # A file the structure check did not call complete is not trusted to its boxes.
    incomplete = _probe("auto", recordings["regular"], mp4="incomplete")
    assert (incomplete.error or "").startswith("cannot run ffprobe")


def test_ffprobe_mode_always_runs_ffprobe(recordings: dict[str, Path]) -> None:
    assert (_probe("ffprobe", recordings["regular"]).error or "").startswith("cannot run ffprobe")


def test_boxes_mode_never_runs_ffprobe(recordings: dict[str, Path], tmp_path: Path) -> None:
    assert _probe("boxes", recordings["regular"]).error is None
    fragmented = make_mp4(tmp_path / "frag.mp4", seconds=2, fragmented=True)
    probe = _probe("boxes", fragmented)
    assert probe.duration_seconds is None
    assert (probe.error or "").startswith("the MP4 boxes do not describe it")
