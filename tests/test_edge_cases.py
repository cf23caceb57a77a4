"""README's edge cases end to end, for the rows only ``decide``'s table covered:
a plain shrink, a new inode at the same path, an append after completion.

Each ends with what stays true whatever the implementation details: the old
stream's outcome, every object byte-exact to the file as it was when it
completed, and no multipart upload left open.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests import mp4gen
from tests.harness import MiB, objects, open_uploads, running
from tests.test_pipeline import assert_clean, assert_stored


async def test_plain_shrink_fails_the_old_stream_and_uploads_the_new_content(
    make_config: Any, watch: Path, s3_client: Any, bucket: str
) -> None:
    dst = watch / "shrunk.mp4"
    async with running(make_config()) as h:
        with dst.open("wb") as f:
            f.write(os.urandom(11 * MiB))
        inode = dst.stat().st_ino
        first = await h.until(
            lambda p: (s := p.for_path(str(dst))) is not None and len(s.parts) == 2,
            what="two parts uploaded",
        )
        first_id = first.by_path[str(dst)]
        os.truncate(dst, 3 * MiB + 7)  # same inode, fewer bytes: no O_TRUNC, no rename
        assert dst.stat().st_ino == inode
        second = await h.terminal(dst)
        old = (await h.projection()).streams[first_id]
    assert old.status == "failed" and old.failure_reason == "truncated"
    assert second.stream_id != first_id
    assert_stored(s3_client, bucket, second, dst.read_bytes())
    assert_clean(s3_client, bucket, 1)


async def test_new_inode_at_the_same_path_is_a_new_stream(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    dst = watch / "replaced.mp4"
    async with running(make_config()) as h:
        with dst.open("wb") as f:
            f.write(os.urandom(11 * MiB))
        inode = dst.stat().st_ino
        first = await h.until(
            lambda p: (s := p.for_path(str(dst))) is not None and len(s.parts) == 2,
            what="two parts uploaded",
        )
        first_id = first.by_path[str(dst)]
        # Write the new file beside it (hidden: ignored), then rename it over.
        staged = watch / ".staged.mp4"
        staged.write_bytes(sources.regular.read_bytes())
        os.replace(staged, dst)
        assert dst.stat().st_ino != inode
        second = await h.terminal(dst)
        old = (await h.projection()).streams[first_id]
    assert old.status == "failed" and old.failure_reason == "truncated"
    assert second.stream_id != first_id
    assert_stored(s3_client, bucket, second, sources.regular.read_bytes())
    assert_clean(s3_client, bucket, 1)


async def test_append_after_completion_is_a_new_object_and_the_first_is_untouched(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    dst = watch / "continued.mp4"
    original = sources.regular.read_bytes()
    extra = os.urandom(64 * 1024)
    async with running(make_config()) as h:
        dst.write_bytes(original)
        first = await h.terminal(dst)
        with dst.open("ab") as f:
            f.write(extra)
        await h.until(
            lambda p: (s := p.for_path(str(dst))) is not None and s.stream_id != first.stream_id,
            what="a second stream",
        )
        second = await h.terminal(dst)
    assert first.key != second.key
    assert_stored(s3_client, bucket, second, original + extra)
    stored = objects(s3_client, bucket)
    assert stored[first.key] == original, "the completed object was changed"
    assert len([k for k in stored if not k.endswith(".metadata.json")]) == 2
    assert open_uploads(s3_client, bucket) == []
