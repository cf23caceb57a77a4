"""``cefmp4 verify``: object vs file vs log, read-only.

Pure: the judgement of each combination of facts and the exit code; the
file's ETag computed as S3 computes it (single PUT: MD5; multipart: the MD5
of the part MD5s, cut by the part plan). End to end, with recordings uploaded
by the real service (one single PUT, one multipart): everything matches (0,
also with ``--sha256``, ``--stream`` and ``--since``, and after the log was
archived and trimmed from Redis); an object overwritten with other bytes is
named (1); a path without a completion cannot be checked (2).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from cefmp4 import cli
from cefmp4.adapters.archive import EventArchive, archive_through
from cefmp4.adapters.checksums import multipart_etag
from cefmp4.adapters.eventlog import EventLog
from cefmp4.adapters.memorystore import MemoryStore
from cefmp4.adapters.storage import ObjectInfo
from cefmp4.domain.config import Config
from cefmp4.domain.partplan import PartPlan, final_parts
from cefmp4.ops.verifycli import (
    Expected,
    FileDigest,
    Target,
    check_one,
    digest_file,
    exit_code,
    judge,
)
from cefmp4.runtime.service import connect
from tests import mp4gen
from tests.harness import running, subprocess_env
from tests.properties import examples
from tests.test_gc import use_config_env

EXPECTED = Expected(stream_id="s1", key="streams/s1/a.mp4", size=10, etag="e", sha256="h",
                    parts=0, sidecar_key="streams/s1/a.mp4.metadata.json")  # fmt: skip
DIGEST = FileDigest(size=10, etag="e", sha256="h", planned_parts=0)
OBJECT = ObjectInfo(size=10, etag="e")


def test_everything_equal_is_ok() -> None:
    v = judge("/w/a.mp4", EXPECTED, DIGEST, OBJECT, sidecar_sha256="h", check_sha256=True)
    assert v.outcome == "ok" and exit_code([v]) == 0


@pytest.mark.parametrize(
    ("digest", "obj", "sidecar", "check"),
    [
        (DIGEST, ObjectInfo(size=10, etag="other"), "h", "etag"),
        (DIGEST, ObjectInfo(size=11, etag="e"), "h", "size"),
        (FileDigest(size=10, etag="e", sha256="z", planned_parts=0), OBJECT, "h", "sha256"),
        (DIGEST, OBJECT, "z", "sha256"),
        (DIGEST, None, "h", "object"),
    ],
)
def test_a_difference_is_named(
    digest: FileDigest, obj: ObjectInfo | None, sidecar: str, check: str
) -> None:
    v = judge("/w/a.mp4", EXPECTED, digest, obj, sidecar_sha256=sidecar, check_sha256=True)
    assert v.outcome == "differs"
    assert [f.check for f in v.findings if f.ok is False] == [check]


def test_what_cannot_be_checked_is_unchecked_and_a_difference_wins() -> None:
    no_log = judge("/w/a.mp4", None, None, None)
    no_file = judge("/w/a.mp4", EXPECTED, None, OBJECT)
    no_s3 = judge("/w/a.mp4", EXPECTED, DIGEST, None, object_error="s3 connection: reset")
    replanned = judge("/w/a.mp4", EXPECTED, FileDigest(size=10, etag=None, sha256=None,
                                                       planned_parts=3), OBJECT)  # fmt: skip
    recorded = msgspec.structs.replace(EXPECTED, plan=PartPlan(5 << 20, 10 << 20))
    replanned_too = judge("/w/a.mp4", recorded, FileDigest(size=10, etag=None, sha256=None,
                                                           planned_parts=3), OBJECT)  # fmt: skip
    for v in (no_log, no_file, no_s3, replanned, replanned_too):
        assert v.outcome == "unchecked", v
        assert exit_code([v]) == 2
    assert "CHUNK_SIZE_BYTES" in replanned.findings[-1].detail
    assert "CHUNK_SIZE_BYTES" not in replanned_too.findings[-1].detail
    differs = judge("/w/b.mp4", EXPECTED, DIGEST, ObjectInfo(size=10, etag="x"))
    assert exit_code([no_log, differs]) == 1
    assert exit_code([judge("/w/a.mp4", EXPECTED, DIGEST, OBJECT), no_log]) == 2


@settings(max_examples=examples(40), deadline=None)
@given(
    st.binary(min_size=1, max_size=5000),
    st.integers(min_value=64, max_value=700),
    st.integers(min_value=64, max_value=700),
)
def test_the_file_etag_is_s3s(tmp_path_factory: Any, data: bytes, first: int, rest: int) -> None:
    plan = PartPlan(first, rest)
    path = tmp_path_factory.mktemp("etag") / "f.mp4"
    path.write_bytes(data)
    single = digest_file(str(path), 0, plan, sha256=True)
    assert single is not None
    assert single.etag == hashlib.md5(data).hexdigest()
    assert single.sha256 == hashlib.sha256(data).hexdigest()
    spans = final_parts(len(data), plan)
    multi = digest_file(str(path), len(spans), plan, sha256=False)
    md5s = [hashlib.md5(data[s.offset : s.end]).hexdigest() for s in spans]
    assert multi is not None and multi.etag == multipart_etag(md5s)
    # Another chunk size than the upload's: the plan does not match, so no ETag.
    other = digest_file(str(path), len(spans) + 1, plan, sha256=False)
    assert other is not None and other.etag is None
    assert digest_file(str(path.with_name("gone.mp4")), 0, plan, sha256=False) is None


def verify(*args: str) -> int:
    return cli.main(["verify", *args])


async def test_verify_end_to_end(
    make_config: Any,
    watch: Path,
    tmp_path: Path,
    sources: mp4gen.Mp4Sources,
    s3_client: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config: Config = make_config(sidecar_sha256=True)
    small, large = watch / "small.mp4", watch / "large.mp4"
    async with running(config) as h:
        shutil.copyfile(sources.regular, small)
        shutil.copyfile(sources.large, large)
        s_small = await h.terminal(small)
        s_large = await h.terminal(large)
    assert s_small.completion is not None and s_small.completion.parts == 0
    assert s_large.completion is not None and s_large.completion.parts > 1

    use_config_env(monkeypatch, subprocess_env(config), tmp_path)
    capsys.readouterr()
    assert await asyncio.to_thread(verify, str(small), str(large), "--sha256") == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 2, out
    assert await asyncio.to_thread(verify, "--stream", s_large.stream_id) == 0
    assert capsys.readouterr().out.count(f"OK        {large}") == 1
    assert await asyncio.to_thread(verify, "--since", "24h", "--sha256") == 0
    assert capsys.readouterr().out.count("OK ") == 2

    # Trimmed from Redis: the completions come from the archive.
    async with connect(config) as (redis, store):
        events = EventLog(redis, config.events_key, "test")
        last = (await events.read_after("0-0", 100_000))[-1][0]
        ms, seq = (int(x) for x in last.split("-"))
        bound = f"{ms}-{seq + 1}"
        assert await archive_through(events, EventArchive(store, config.event_archive_prefix),
                                     bound) == last  # fmt: skip
        assert isinstance(redis, aioredis.Redis)
        await redis.xtrim(config.events_key, minid=bound)
        assert await redis.xlen(config.events_key) == 0
    assert await asyncio.to_thread(verify, str(small), str(large), "--sha256") == 0
    assert capsys.readouterr().out.count("OK ") == 2

    # Other bytes in the bucket: named, exit 1.
    s3_client.put_object(Bucket=bucket, Key=s_small.key, Body=b"not the recording")
    assert await asyncio.to_thread(verify, str(small), str(large)) == 1
    out = capsys.readouterr().out
    [differs] = [line for line in out.splitlines() if line.startswith("DIFFERS")]
    assert str(small) in differs and "size" in differs and "etag" in differs
    assert f"OK        {large}" in out

    # No completion recorded for this path: cannot be checked, exit 2.
    stranger = watch / "never-seen.mp4"
    stranger.write_bytes(b"x")
    assert await asyncio.to_thread(verify, str(stranger)) == 2
    assert "UNCHECKED" in capsys.readouterr().out


@pytest.mark.parametrize("cut_by", ["recorded", "unrecorded"])
async def test_an_object_cut_by_either_plan_verifies_and_other_bytes_do_not(
    tmp_path: Path, cut_by: str
) -> None:
    """FileSeen recorded (3, 5); a replica from before plans ignores that and
    completes the object by its own CHUNK_SIZE_BYTES (4). Either layout is
    the file's (the ETag binds every part's MD5); a different byte is not."""
    data = bytes(range(256)) * 60  # 15,360 bytes: 4 parts under both plans
    path = tmp_path / "a.mp4"
    path.write_bytes(data)
    recorded = PartPlan(3 * 1024, 5 * 1024)
    config = Config(chunk_size_bytes=4 * 1024)  # the scale model: no 5 MiB floor here
    plan = recorded if cut_by == "recorded" else config.unrecorded_plan
    spans = final_parts(len(data), plan)
    store = MemoryStore("bucket", min_part_size=1)
    upload = await store.create_multipart("k", "video/mp4")
    etags = [await store.upload_part("k", upload, sp.number, data[sp.offset : sp.end], "")
             for sp in spans]  # fmt: skip
    etag = await store.complete_multipart("k", upload, list(enumerate(etags, start=1)))
    expected = Expected(stream_id="s1", key="k", size=len(data), etag=etag, sha256="",
                        parts=len(spans), sidecar_key="k.metadata.json", plan=recorded)  # fmt: skip
    verdict = await check_one(config, store, Target(str(path), "s1"), expected, sha256=False)
    assert verdict.outcome == "ok", verdict.findings
    path.write_bytes(data[:-1] + b"\x00")
    verdict = await check_one(config, store, Target(str(path), "s1"), expected, sha256=False)
    assert verdict.outcome == "differs"
