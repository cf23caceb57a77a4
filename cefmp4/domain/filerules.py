"""Which directory entries are recordings: a pure rule over stat facts.

A ``*.mp4`` name under WATCH_DIR can be anything: a regular file (the normal
case), a symlink to one (inside the tree, or to ``/etc/shadow``), a FIFO (an
open for reading blocks until a writer comes), a socket, a device, a
directory. ``cefmp4.adapters.files.look`` gathers the facts with ``lstat``, ``stat``
and ``realpath`` (never an ``open``) and this module decides:

* a directory is not a recording, silently (``x.mp4/`` is just a folder; the
  walk descends into it like any other);
* anything else that is not a regular file once links are followed is
  skipped as ``special_file``;
* a path that goes through a symlink (its last component or a directory on
  the way; WATCH_DIR itself is resolved first) is followed according to
  ``FOLLOW_SYMLINKS``: ``inside`` (default) only if the real path is inside
  WATCH_DIR (``symlink_outside`` otherwise), ``outside``/``all`` always,
  ``never`` not at all (``symlink``).

A followed link is a recording under the link's own path (its key and events
name the link), with the target's size, mtime and inode.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FollowSymlinks = Literal["inside", "outside", "all", "never"]
Kind = Literal["regular", "directory", "special"]
SkipReason = Literal["symlink_outside", "symlink", "special_file"]


class FileStat(msgspec.Struct, frozen=True):
    """What a stat says about a recording: enough to tell whether it changed."""

    size: int
    mtime_ns: int
    inode: int


class Admit(msgspec.Struct, frozen=True):
    """A recording: look at it."""


class Ignore(msgspec.Struct, frozen=True):
    """Not a file at all (a directory): as if nothing were there."""


class Skip(msgspec.Struct, frozen=True):
    """A file the service will not read; reported once per path."""

    reason: SkipReason


Decision = Admit | Ignore | Skip


def admit(kind: Kind, *, via_link: bool, inside: bool, follow: FollowSymlinks) -> Decision:
    """``kind`` of what the path resolves to; ``via_link``: resolving it went
    through a symlink; ``inside``: its real path is inside WATCH_DIR."""
    if via_link:
        if follow == "never":
            return Skip("symlink")
        if follow == "inside" and not inside:
            return Skip("symlink_outside")
    if kind == "directory":
        return Ignore()
    if kind == "special":
        return Skip("special_file")
    return Admit()
