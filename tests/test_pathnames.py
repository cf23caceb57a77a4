"""The wire form of paths, object keys and the symlink rule: pure units."""

from __future__ import annotations

import os
import re
import unicodedata

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cefmp4.domain.filerules import Admit, Ignore, Skip, admit
from cefmp4.domain.objectkeys import MAX_KEY_BYTES, SIDECAR_SUFFIX, extension, object_key
from cefmp4.domain.pathnames import to_fs, to_fs_str, to_wire

# Any path Linux allows: bytes without NUL (``/`` included, as separators).
fs_paths = st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\x00", b"_"))
# Names that need no escaping: printable, valid UTF-8, no '%'.
plain = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="%\ufffe\uffff\x00"),
    min_size=1,
    max_size=100,
)


@given(fs_paths)
@example(b"caf\xe9.mp4")
@example(b"a\nb.mp4")
@example(b"100%.mp4")
@example(b"%E9.mp4")
@example(b"\xed\xb3\xa9")  # an encoded surrogate is not valid UTF-8
def test_round_trip_for_any_bytes(raw: bytes) -> None:
    assert to_fs(to_wire(raw)) == raw
    assert to_fs(to_wire(os.fsdecode(raw))) == raw  # str as os.walk gives it
    assert os.fsencode(to_fs_str(to_wire(raw))) == raw


@given(fs_paths)
def test_wire_form_is_printable_utf8(raw: bytes) -> None:
    wire = to_wire(raw)
    wire.encode("utf-8")  # strict: no surrogates
    assert not any(unicodedata.category(c) == "Cc" for c in wire)
    assert "\ufffe" not in wire and "\uffff" not in wire
    # Every '%' starts an escape, so the form is canonical and reversible.
    for i, c in enumerate(wire):
        if c == "%":
            assert re.fullmatch("[0-9A-F]{2}", wire[i + 1 : i + 3]), wire


@given(plain)
def test_plain_names_are_unchanged(name: str) -> None:
    assert to_wire(name) == name
    assert to_wire(name.encode()) == name
    assert to_fs(name) == name.encode()


def test_documented_examples() -> None:
    assert to_wire(b"caf\xe9.mp4") == "caf%E9.mp4"
    assert to_wire("café.mp4") == "café.mp4"
    assert to_wire(b"a\nb.mp4") == "a%0Ab.mp4"
    assert to_wire(b"50%.mp4") == "50%25.mp4"
    assert to_wire(b"-rf .mp4") == "-rf .mp4"
    assert to_wire("\x85.mp4") == "%C2%85.mp4"  # C1 control (NEL)


def test_to_fs_is_lenient_with_non_canonical_text() -> None:
    assert to_fs("100%.mp4") == b"100%.mp4"
    assert to_fs("%zz%e9") == b"%zz\xe9"


# -- object keys -------------------------------------------------------------

rels = st.lists(
    st.text(st.characters(blacklist_characters="/\x00"), min_size=1, max_size=120),
    min_size=1,
    max_size=12,
).map(lambda parts: to_wire("/".join(parts).encode("utf-8", "surrogatepass")) + ".mp4")
prefixes = st.sampled_from(["streams/", "", "a/very/long/prefix/" * 10, "é/"])
STREAM = "20261124T013709123Z-9f1c2a4b7d3e"


@given(prefixes, rels)
def test_key_within_limit_keeps_stream_and_extension(prefix: str, rel: str) -> None:
    key = object_key(prefix, STREAM, rel)
    assert len((key + SIDECAR_SUFFIX).encode()) <= 1024
    assert len(key.encode()) <= MAX_KEY_BYTES
    assert key.startswith(f"{prefix}{STREAM}/")
    assert key.endswith(extension(rel)) and extension(rel) == ".mp4"
    assert object_key(prefix, STREAM, rel) == key  # deterministic
    if len(f"{prefix}{STREAM}/{rel}".encode()) <= MAX_KEY_BYTES:
        assert key == f"{prefix}{STREAM}/{rel}"
    else:
        assert "~" in key
        # Still canonical wire form: no escape was cut in half.
        assert to_wire(to_fs(key)) == key


@given(rels, rels)
def test_distinct_long_paths_get_distinct_keys(a: str, b: str) -> None:
    long_a, long_b = "d/" * 600 + a, "d/" * 600 + b
    if long_a != long_b:
        assert object_key("streams/", STREAM, long_a) != object_key("streams/", STREAM, long_b)


def test_shortened_key_example() -> None:
    rel = "/".join([f"camera-{i:02d}" for i in range(120)]) + "/clip.mp4"
    key = object_key("streams/", STREAM, rel)
    assert len(key.encode()) <= MAX_KEY_BYTES
    assert key.startswith(f"streams/{STREAM}/camera-00/") and key.endswith("/clip.mp4")


def test_no_room_for_a_path_is_an_error() -> None:
    with pytest.raises(ValueError, match="no room"):
        object_key("p" * 1100, STREAM, "x" * 2000 + ".mp4")


# -- which entries are recordings ---------------------------------------------


@pytest.mark.parametrize(
    ("kind", "via_link", "inside", "follow", "expected"),
    [
        ("regular", False, True, "inside", Admit()),
        ("regular", True, True, "inside", Admit()),
        ("regular", True, False, "inside", Skip("symlink_outside")),
        ("regular", True, False, "outside", Admit()),
        ("regular", True, False, "all", Admit()),
        ("regular", True, True, "never", Skip("symlink")),
        ("regular", False, True, "never", Admit()),
        ("directory", False, True, "inside", Ignore()),
        ("special", False, True, "inside", Skip("special_file")),
        ("special", True, True, "all", Skip("special_file")),
        ("directory", True, False, "inside", Skip("symlink_outside")),
    ],
)
def test_admit(kind: str, via_link: bool, inside: bool, follow: str, expected: object) -> None:
    assert admit(kind, via_link=via_link, inside=inside, follow=follow) == expected  # type: ignore[arg-type]
