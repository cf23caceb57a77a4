"""What the service exposes to its neighbours: the metrics endpoint's
interface, and the container image's user.

The metrics check runs the real ``cefmp4 run`` as a child process and reads
the kernel's table of *that process's* listening sockets (its fds matched
against ``/proc/net/tcp``/``tcp6``), so it fails if the endpoint binds every
interface even though 127.0.0.1 would answer either way. The image is built
and run only by ``tests/test_image.py`` (``-m image``); here the Dockerfile and
compose file are parsed for the few lines that make it non-root.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from cefmp4.dev.localservers import free_port
from cefmp4.domain.config import Config
from tests.harness import ServiceProcess

REPO = Path(__file__).resolve().parent.parent
TCP_LISTEN = "0A"


def _address(hex_addr: str, family: int) -> str:
    raw = bytes.fromhex(hex_addr)
    # /proc/net/tcp* prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, words)


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed while we looked
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(m.group(1))
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN and inode in inodes:
                host, port = local.split(":")
                found.add((_address(host, family), int(port, 16)))
    return found


@pytest.mark.parametrize(("metrics_addr", "bound"), [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_metrics_endpoint_binds_the_configured_interface(
    make_config: Callable[..., Config],
    tmp_path: Path,
    metrics_addr: str | None,
    bound: str,
) -> None:
    port = free_port()
    config = make_config(prom_port=port)
    assert config.metrics_addr == "127.0.0.1"  # the default, which the first case runs
    service = ServiceProcess(config, tmp_path / "service.log")
    if metrics_addr is not None:
        service.env["METRICS_ADDR"] = metrics_addr
    with service:
        assert listening_sockets(service.pid) == {(bound, port)}, service.tail()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert answer.status == 200
            assert b"cefmp4_live_streams" in answer.read()


# --- the image: checked from its source ---


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_image_runs_as_a_fixed_non_root_uid_with_metrics_on_all_interfaces() -> None:
    steps = instructions((REPO / "deploy" / "Dockerfile").read_text())
    # Every stage is FROM ${BASE}, which defaults to python:3.11-slim.
    assert ("ARG", "BASE=python:3.11-slim") in steps
    assert {arg.split()[0] for op, arg in steps if op == "FROM"} == {"${BASE}"}
    users = [arg for op, arg in steps if op == "USER"]
    assert users, "no USER: the container would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, users[-1]  # numeric: no passwd lookup needed
    assert gid.isdigit() and int(gid) != 0, users[-1]
    # The user exists in the image with that UID (files, ps, logs show a name).
    assert any(op == "RUN" and f"--uid {uid}" in arg for op, arg in steps)
    # Everything after USER runs unprivileged; the process must be the last step's.
    last_user = max(i for i, (op, _) in enumerate(steps) if op == "USER")
    assert all(op != "RUN" for op, _ in steps[last_user:])
    env = " ".join(arg for op, arg in steps if op == "ENV").split()
    assert "METRICS_ADDR=0.0.0.0" in env


def test_compose_example_opens_metrics_inside_and_shows_group_add() -> None:
    compose = (REPO / "deploy" / "docker-compose.yml").read_text()
    assert re.search(r"^\s+METRICS_ADDR: 0\.0\.0\.0$", compose, re.MULTILINE)
    assert re.search(r"^\s+group_add: ", compose, re.MULTILINE)
