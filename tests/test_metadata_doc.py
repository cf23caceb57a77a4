"""The metadata sidecar: ``summarize`` (ffprobe JSON -> Probe) and ``sidecar``.

The sidecar is the seed's deliverable next to every video, read by people and
other programs, so its field names and its ``chunks`` list are pinned here.
Both functions are pure; no ffprobe, Redis or S3 is needed. So is
``encode_sidecar``, whose bound (``SIDECAR_MAX_BYTES``, identity fields kept)
is a property test over hostile ffprobe output; the bounded read of ffprobe's
output runs fake ffprobe scripts.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cefmp4.domain.events import (
    Event,
    FileSeen,
    PartUploaded,
    StreamCompleted,
    UploadStarted,
)
from consumers.metadata import (
    IDENTITY_FIELDS,
    MAX_CHUNKS_LISTED,
    MAX_STREAMS_LISTED,
    MAX_STRING_CHARS,
    SIDECAR_MAX_BYTES,
    Probe,
    encode_sidecar,
    run_ffprobe,
    sidecar,
    summarize,
)
from projections.streams import Part, StreamState, replay
from tests.properties import examples

MiB = 1024 * 1024
STARTED = datetime(2024, 5, 17, 13, 0, 0, tzinfo=UTC)
DONE = datetime(2024, 5, 17, 13, 30, 0, 250000, tzinfo=UTC)
NOW = datetime(2024, 5, 17, 13, 30, 5, tzinfo=UTC)

# Trimmed from `ffprobe -v error -print_format json -show_format -show_streams`
# on an OBS recording (H.264 + AAC); numbers are strings, as ffprobe writes them.
FFPROBE_JSON = b"""{
    "streams": [
        {
            "index": 0,
            "codec_name": "h264",
            "codec_long_name": "H.264 / AVC / MPEG-4 AVC / MPEG-4 part 10",
            "profile": "High",
            "codec_type": "video",
            "codec_tag_string": "avc1",
            "width": 1920,
            "height": 1080,
            "coded_width": 1920,
            "coded_height": 1080,
            "pix_fmt": "yuv420p",
            "level": 42,
            "r_frame_rate": "60/1",
            "avg_frame_rate": "60/1",
            "time_base": "1/15360",
            "duration": "12.016667",
            "bit_rate": "5987654",
            "nb_frames": "721",
            "disposition": {"default": 1, "dub": 0},
            "tags": {"language": "und", "handler_name": "VideoHandler"}
        },
        {
            "index": 1,
            "codec_name": "aac",
            "profile": "LC",
            "codec_type": "audio",
            "sample_fmt": "fltp",
            "sample_rate": "48000",
            "channels": 2,
            "channel_layout": "stereo",
            "bit_rate": "160000",
            "duration": "12.010667"
        }
    ],
    "format": {
        "filename": "/w/cam1/2024-05-17 13-00-00.mp4",
        "nb_streams": 2,
        "nb_programs": 0,
        "format_name": "mov,mp4,m4a,3gp,3g2,mj2",
        "format_long_name": "QuickTime / MOV",
        "start_time": "0.000000",
        "duration": "12.016667",
        "size": "9238457",
        "bit_rate": "6150388",
        "probe_score": 100,
        "tags": {"major_brand": "isom", "encoder": "Lavf60.3.100"}
    }
}"""


def test_summarize_real_ffprobe_output() -> None:
    probe = summarize(FFPROBE_JSON)
    assert probe.error is None
    assert probe.duration_seconds == 12.016667
    assert probe.container == {
        "format_name": "mov,mp4,m4a,3gp,3g2,mj2",
        "format_long_name": "QuickTime / MOV",
        "bit_rate": 6150388,
        "nb_streams": 2,
    }
    # Only the summary keys survive: tags, dispositions and file names (which
    # can hold private paths) stay out of the public sidecar.
    assert probe.streams == [
        {
            "index": 0,
            "codec_type": "video",
            "codec_name": "h264",
            "profile": "High",
            "width": 1920,
            "height": 1080,
            "pix_fmt": "yuv420p",
            "avg_frame_rate": "60/1",
            "bit_rate": "5987654",
        },
        {
            "index": 1,
            "codec_type": "audio",
            "codec_name": "aac",
            "profile": "LC",
            "sample_rate": "48000",
            "channels": 2,
            "bit_rate": "160000",
        },
    ]


def test_summarize_without_duration() -> None:
    # ffprobe writes "N/A" or leaves the key out for a file it cannot time
    # (e.g. no moov yet); the sidecar must still be written, with null.
    for fmt in ('{"format_name": "mov,mp4,m4a,3gp,3g2,mj2"}', '{"duration": "N/A"}'):
        probe = summarize(f'{{"streams": [], "format": {fmt}}}'.encode())
        assert probe.duration_seconds is None
        assert probe.error == "ffprobe reported no duration"
        assert probe.streams == []
    empty = summarize(b"{}")
    assert empty.duration_seconds is None and empty.error is not None
    assert empty.container is not None and empty.container["bit_rate"] is None


def test_summarize_non_json() -> None:
    probe = summarize(b"moov atom not found\n")
    assert probe.duration_seconds is None
    assert probe.container is None
    assert probe.streams == []
    assert probe.error is not None and probe.error.startswith("ffprobe output is not JSON")


# --- sidecar ---

SEED_FIELDS = {
    "stream_id",
    "original_file_path",
    "s3_bucket",
    "s3_key_prefix",
    "total_size_bytes",
    "duration_seconds",
    "processed_at_utc",
    "stream_started_at_utc",
    "stream_completed_at_utc",
    "chunks",
}
CHUNK_FIELDS = {"part_number", "size_bytes", "etag", "uploaded_at_utc"}
SID = "20240517T130000000Z-9f1c2a4b7d3e"
KEY = f"streams/{SID}/cam1/a.mp4"


def state(parts: dict[int, Part] | None = None) -> StreamState:
    return StreamState(
        stream_id=SID,
        path="/w/cam1/a.mp4",
        rel_path="cam1/a.mp4",
        bucket="video-streams",
        key=KEY,
        inode=7,
        started_at=STARTED,
        status="completed",
        size=0,
        upload_id=None if parts is None else "u1",
        parts=parts or {},
    )


def completion(size: int, parts: int, etag: str = '"etag-final"') -> StreamCompleted:
    return StreamCompleted(
        stream_id=SID,
        at=DONE,
        bucket="video-streams",
        key=KEY,
        size=size,
        etag=etag,
        sha256="ab" * 32,
        mtime_ns=123,
        parts=parts,
        mp4="complete",
    )


def part(number: int, etag: str, size: int = 5 * MiB) -> Part:
    return Part(
        number=number,
        offset=(number - 1) * 5 * MiB,
        size=size,
        etag=etag,
        md5="0" * 32,
        uploaded_at=STARTED + timedelta(minutes=number),
    )


def test_sidecar_has_the_seed_fields_plus_sha256_and_mp4_complete() -> None:
    doc = sidecar(state(), completion(1234, 0), summarize(FFPROBE_JSON), "streams/", NOW)
    assert SEED_FIELDS | {"sha256", "mp4_complete"} <= set(doc)
    assert doc["stream_id"] == SID
    assert doc["original_file_path"] == "/w/cam1/a.mp4"
    assert doc["s3_bucket"] == "video-streams"
    assert doc["s3_key_prefix"] == f"streams/{SID}/"
    assert KEY.startswith(doc["s3_key_prefix"])
    assert doc["total_size_bytes"] == 1234
    assert doc["duration_seconds"] == 12.016667
    assert doc["sha256"] == "ab" * 32
    assert doc["mp4_complete"] is True
    # UTC, ISO 8601 with a Z, as the seed's sidecar had.
    assert doc["processed_at_utc"] == "2024-05-17T13:30:05Z"
    assert doc["stream_started_at_utc"] == "2024-05-17T13:00:00Z"
    assert doc["stream_completed_at_utc"] == "2024-05-17T13:30:00.250000Z"
    # The document goes out as JSON: everything in it must be plain JSON.
    assert json.loads(json.dumps(doc)) == doc


def test_sidecar_mp4_complete_false_for_other_verdicts() -> None:
    done = msgspec.structs.replace(completion(10, 0), mp4="fragmented", mp4_reason="moof")
    doc = sidecar(state(), done, Probe(None, None, [], "x"), "streams/", NOW)
    assert doc["mp4_complete"] is False
    assert doc["duration_seconds"] is None


def test_single_put_is_one_chunk_of_the_whole_size() -> None:
    # parts == 0: one PutObject; the seed's chunks list still has one entry.
    doc = sidecar(state(), completion(4321, 0, '"single"'), summarize(b"{}"), "streams/", NOW)
    assert doc["chunks"] == [
        {
            "part_number": 1,
            "size_bytes": 4321,
            "etag": '"single"',
            "uploaded_at_utc": "2024-05-17T13:30:00.250000Z",
        }
    ]


def test_multipart_chunks_are_the_completed_parts_in_order() -> None:
    parts = {3: part(3, "c", 7), 1: part(1, "a"), 2: part(2, "b")}
    doc = sidecar(state(parts), completion(10 * MiB + 7, 3), summarize(b"{}"), "streams/", NOW)
    assert [set(c) for c in doc["chunks"]] == [CHUNK_FIELDS] * 3
    assert [(c["part_number"], c["etag"], c["size_bytes"]) for c in doc["chunks"]] == [
        (1, "a", 5 * MiB),
        (2, "b", 5 * MiB),
        (3, "c", 7),
    ]
    assert sum(c["size_bytes"] for c in doc["chunks"]) == doc["total_size_bytes"]
    assert doc["chunks"][0]["uploaded_at_utc"] == "2024-05-17T13:01:00Z"


def test_parts_beyond_the_completion_are_not_listed() -> None:
    # Parts 3 and 4 are in the state (e.g. sent under a plan the completion did
    # not use); the object has only parts 1-2, so only those are described.
    parts = {n: part(n, f"e{n}") for n in (1, 2, 3, 4)}
    doc = sidecar(state(parts), completion(10 * MiB, 2), summarize(b"{}"), "streams/", NOW)
    assert [c["part_number"] for c in doc["chunks"]] == [1, 2]


def test_replaced_upload_parts_are_not_listed() -> None:
    # The first upload (u1) got to part 3, was lost (lifecycle abort), and the
    # finalizer completed a second upload (u2) with 2 parts. Late u1 parts must
    # not appear next to u2's: the sidecar describes the object that exists.
    t = STARTED
    log: list[Event] = [
        FileSeen(
            stream_id=SID,
            at=t,
            path="/w/cam1/a.mp4",
            rel_path="cam1/a.mp4",
            bucket="video-streams",
            key=KEY,
            size=0,
            mtime_ns=0,
            inode=7,
        ),
        UploadStarted(stream_id=SID, at=t, upload_id="u1"),
        *(
            PartUploaded(
                stream_id=SID,
                at=t,
                upload_id="u1",
                part_number=n,
                offset=(n - 1) * 5 * MiB,
                size=5 * MiB,
                etag=f"old{n}",
                md5="0" * 32,
            )
            for n in (1, 2, 3)
        ),
        UploadStarted(stream_id=SID, at=t, upload_id="u2"),
        *(
            PartUploaded(
                stream_id=SID,
                at=t,
                upload_id=upload_id,
                part_number=n,
                offset=(n - 1) * 5 * MiB,
                size=5 * MiB if n == 1 else 100,
                etag=etag,
                md5="0" * 32,
            )
            for upload_id, n, etag in (
                ("u2", 1, "new1"),
                ("u1", 3, "late3"),
                ("u2", 2, "new2"),
                ("u1", 2, "late2"),  # same number as a u2 part: must not replace it
            )
        ),
    ]
    done = completion(5 * MiB + 100, 2)
    log.append(done)
    s = replay([(f"{i}-0", e) for i, e in enumerate(log, start=1)]).streams[SID]
    doc = sidecar(s, done, summarize(b"{}"), "streams/", NOW)
    assert [(c["part_number"], c["etag"]) for c in doc["chunks"]] == [(1, "new1"), (2, "new2")]
    assert sum(c["size_bytes"] for c in doc["chunks"]) == doc["total_size_bytes"]


# --- hostile or huge descriptions: the sidecar stays within SIDECAR_MAX_BYTES ---

KEPT_STREAM_KEYS = (
    "index", "codec_type", "codec_name", "profile", "width", "height",
    "pix_fmt", "avg_frame_rate", "sample_rate", "channels", "bit_rate",
)  # fmt: skip


def long_text(max_repeat: int = 3000) -> st.SearchStrategy[str]:
    # Long strings cheaply: a short random piece repeated (control characters
    # included, which JSON escapes to six bytes each).
    return st.builds(lambda piece, n: piece * n, st.text(max_size=12), st.integers(0, max_repeat))


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), long_text(), st.just("1" * 5000)
)
TAGS = st.dictionaries(st.text(max_size=8), long_text(), max_size=30)
FF_STREAM = st.fixed_dictionaries(
    {}, optional={**{k: SCALARS for k in KEPT_STREAM_KEYS}, "tags": TAGS, "nested": st.just({})}
)
FF_STREAMS = st.builds(
    lambda one, n, others: [one] * n + others,
    FF_STREAM,
    st.integers(0, 2000),
    st.lists(FF_STREAM, max_size=4),
)
FF_FORMAT = st.fixed_dictionaries(
    {},
    optional={
        "duration": st.one_of(SCALARS, st.just("12.5"), st.just("inf")),
        "format_name": SCALARS,
        "format_long_name": SCALARS,
        "bit_rate": st.one_of(SCALARS, st.just("6150388"), st.just("\u00b2")),
        "nb_streams": SCALARS,
        "tags": TAGS,
    },
)
FFPROBE_OUTPUTS = st.one_of(
    st.builds(lambda s, f: msgspec.json.encode({"streams": s, "format": f}), FF_STREAMS, FF_FORMAT),
    st.binary(max_size=64),  # not JSON at all
    st.sampled_from([b"[]", b'{"streams": null}', b'{"streams": [1, 2]}', b'"x"']),
)


def big_state(sid: str, path: str, rel_path: str, key: str, parts: int, etag: str) -> StreamState:
    template = part(1, etag)
    return msgspec.structs.replace(
        state(),
        stream_id=sid,
        path=path,
        rel_path=rel_path,
        key=key,
        upload_id="u1" if parts else None,
        parts={n: msgspec.structs.replace(template, number=n) for n in range(1, parts + 1)},
    )


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ffprobe_json=FFPROBE_OUTPUTS,
    parts=st.integers(0, 10_000),
    sid=st.text(min_size=1, max_size=40),
    path=long_text(400),
    rel_path=long_text(400),
    # S3 keys are at most 1024 bytes of UTF-8; that bound is the contract.
    key=long_text(1024).map(lambda k: k.encode()[:1024].decode(errors="ignore")),
    etag=st.text(max_size=64),
    sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
    reason=long_text(),
    mp4=st.sampled_from(["complete", "incomplete", "fragmented", "invalid"]),
    # The default, and one small enough that every truncation step is needed.
    limit=st.sampled_from([SIDECAR_MAX_BYTES, 16 * 1024]),
)
def test_encoded_sidecar_never_exceeds_the_limit_and_keeps_identity(
    ffprobe_json: bytes,
    parts: int,
    sid: str,
    path: str,
    rel_path: str,
    key: str,
    etag: str,
    sha256: str,
    reason: str,
    mp4: Any,
    limit: int,
) -> None:
    s = big_state(sid, path, rel_path, key, parts, etag)
    size = parts * 5 * MiB or 1234
    done = msgspec.structs.replace(
        completion(size, parts, etag),
        stream_id=sid,
        key=key,
        sha256=sha256,
        mp4=mp4,
        mp4_reason=reason,
    )
    probe = summarize(ffprobe_json)
    doc = sidecar(s, done, probe, "streams/", NOW)
    body = encode_sidecar(doc, limit)
    assert len(body) <= limit
    out = json.loads(body)
    identity = {
        "stream_id": sid,
        "s3_bucket": "video-streams",
        "s3_key_prefix": f"streams/{sid}/",
        "s3_key": key,
        "total_size_bytes": size,
        "etag": etag,
        "sha256": sha256,
    }
    assert {k: out[k] for k in IDENTITY_FIELDS} == identity
    assert out["chunks_total"] == max(parts, 1)
    assert out["streams_total"] == probe.streams_total
    assert isinstance(out["truncated"], bool)
    assert len(out["chunks"]) <= MAX_CHUNKS_LISTED
    assert len(out["streams"]) <= MAX_STREAMS_LISTED
    # What was listed is the first chunks, unchanged.
    assert [c["part_number"] for c in out["chunks"]] == list(range(1, len(out["chunks"]) + 1))
    if not out["truncated"]:
        assert out == json.loads(json.dumps(doc))


def test_a_whole_first_tier_of_parts_and_many_streams_fit_untruncated() -> None:
    # The limit must leave honest documents alone: 1000 parts (10 GiB at the
    # default part size) and MAX_STREAMS_LISTED ordinary streams.
    video = msgspec.json.decode(FFPROBE_JSON)["streams"][0]
    ffprobe = msgspec.json.encode({"streams": [video] * MAX_STREAMS_LISTED, "format": {}})
    s = big_state(SID, "/w/" + "d" * 250 + "/a.mp4", "a.mp4", KEY, MAX_CHUNKS_LISTED, '"e-1"')
    done = completion(MAX_CHUNKS_LISTED * 5 * MiB, MAX_CHUNKS_LISTED, '"' + "f" * 32 + '-1000"')
    out = json.loads(encode_sidecar(sidecar(s, done, summarize(ffprobe), "streams/", NOW)))
    assert out["truncated"] is False
    assert len(out["chunks"]) == out["chunks_total"] == MAX_CHUNKS_LISTED
    assert len(out["streams"]) == out["streams_total"] == MAX_STREAMS_LISTED


def test_chunks_beyond_the_bound_are_counted_not_listed() -> None:
    s = big_state(SID, "/w/cam1/a.mp4", "cam1/a.mp4", KEY, 10_000, '"e"')
    doc = sidecar(s, completion(10_000 * 5 * MiB, 10_000), summarize(b"{}"), "streams/", NOW)
    out = json.loads(encode_sidecar(doc))
    assert out["chunks_total"] == 10_000
    assert [c["part_number"] for c in out["chunks"]] == list(range(1, MAX_CHUNKS_LISTED + 1))
    assert out["truncated"] is False


def test_summary_drops_tags_and_bounds_streams_and_strings() -> None:
    hostile = {
        "streams": [
            {
                "index": n,
                "codec_name": "x" * 100_000,
                "profile": {"nested": "object"},
                "tags": {f"t{i}": "v" * 100 for i in range(1000)},
            }
            for n in range(500)
        ],
        "format": {"duration": "5.0", "bit_rate": "9" * 5000, "nb_streams": "500"},
    }
    probe = summarize(msgspec.json.encode(hostile))
    assert probe.streams_total == 500
    assert len(probe.streams) == MAX_STREAMS_LISTED
    assert probe.streams[0] == {"index": 0, "codec_name": "x" * (MAX_STRING_CHARS - 1) + "\u2026"}
    assert probe.container is not None
    # 5000 digits would make int() raise; it is not a bit rate anyone wrote.
    assert probe.container["bit_rate"] is None
    assert probe.container["nb_streams"] == 500
    assert probe.duration_seconds == 5.0


def test_hostile_strings_end_in_the_truncated_marker_not_an_oversized_sidecar() -> None:
    # 64 streams of 1 KiB control characters: each escapes to 6 KiB of JSON.
    evil = "\x01" * MAX_STRING_CHARS
    ffprobe = msgspec.json.encode(
        {"streams": [dict.fromkeys(KEPT_STREAM_KEYS, evil)] * 64, "format": {}}
    )
    doc = sidecar(state(), completion(10, 0), summarize(ffprobe), "streams/", NOW)
    body = encode_sidecar(doc)
    assert len(body) <= SIDECAR_MAX_BYTES < len(msgspec.json.encode(doc))
    out = json.loads(body)
    assert out["truncated"] is True
    assert out["streams"] == [] and out["container"] is None
    assert out["streams_total"] == 64
    assert out["chunks"] == doc["chunks"]  # the probe went first; the chunks fit after it


@pytest.mark.parametrize(
    "output",
    [b"[]", b'{"streams": null}', b'{"streams": [1]}', b'{"format": "x"}', b'"text"'],
)
def test_summary_of_json_of_another_shape_is_an_error_not_a_crash(output: bytes) -> None:
    probe = summarize(output)
    assert probe.duration_seconds is None and probe.streams == []
    assert probe.error is not None and probe.error.startswith("ffprobe output is not JSON")


# --- ffprobe as a subprocess: its output is read bounded ---


def fake_ffprobe(tmp_path: Path, script: str) -> str:
    exe = tmp_path / "ffprobe"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(0o755)
    return str(exe)


async def test_endless_ffprobe_output_is_cut_at_the_cap(tmp_path: Path) -> None:
    # Were stdout read to the end, this would run until the 60 s timeout and
    # say "timed out"; the cap ends it with its own error.
    exe = fake_ffprobe(tmp_path, 'exec yes \'{"streams": [{"index": 0}, \'\n')
    probe = await run_ffprobe(exe, "x.mp4", max_output=1 * MiB)
    assert probe.error == f"ffprobe output exceeds {1 * MiB} bytes"
    assert probe.streams == [] and probe.duration_seconds is None


async def test_a_stderr_flood_neither_stalls_ffprobe_nor_is_kept(tmp_path: Path) -> None:
    flood = "head -c 4000000 /dev/zero | tr '\\0' 'e' >&2"
    ok = fake_ffprobe(tmp_path, f'{flood}\necho \'{{"format": {{"duration": "2.5"}}}}\'\n')
    assert (await run_ffprobe(ok, "x.mp4")).duration_seconds == 2.5
    failing = fake_ffprobe(tmp_path, f"{flood}\necho 'moov atom not found' >&2\nexit 1\n")
    probe = await run_ffprobe(failing, "x.mp4")
    assert probe.error is not None
    assert probe.error.startswith("ffprobe exit 1: ") and probe.error.endswith(
        "moov atom not found"
    )
    assert len(probe.error) <= 600
