"""Build and run deploy/Dockerfile with podman, with no registry at all.

The image test (``tests/test_image.py``, ``task image-test``) must work on a
machine without a Docker engine or Docker Hub, so everything the build would
pull is made here:

* **The base image** is a debootstrap'ed Debian bookworm (``minbase`` plus
  python3 and python3-venv: bookworm's Python is 3.11, like
  ``python:3.11-slim``), imported with ``podman import``. The rootfs tarball
  is cached under ``.cefmp4/image-base/``, named for what went into it
  (``base_key``), so a rerun only imports it, or reuses the imported image.
* **The Python dependencies** are wheels built on the host with the test's
  own pip (``build_wheels``), pinned to the versions the test environment has,
  so the image runs what the suite tested.
* **podman** runs with ``runc`` and explicit ulimits from a containers.conf
  written here (``containers_conf``): crun, and runc with podman's default
  limits, fail in an unprivileged outer container with ``setrlimit ...
  Operation not permitted``, because nothing may raise a limit there.

Only ``containers_conf`` and ``base_key`` are decisions; the rest is I/O.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO / ".cefmp4" / "image-base"
WHEELS_DIR = REPO / "build" / "wheels"

BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# The same apt sources as the official Debian (and so python:3.11-slim)
# images, so the Dockerfile's apt-get gets the same security updates there.
DEBIAN_SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# What a rootfs needs no copy of: apt caches (the Dockerfile runs apt-get
# update), documentation and translations. Relative to the rootfs.
BASE_PRUNE = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
              "usr/share/locale")  # fmt: skip
# podman lowers its own RLIMIT_NPROC hard limit to this before it starts
# conmon (measured: conmon runs with 32768/32768 whatever the shell had), and
# runc cannot raise the container's above what conmon has.
PODMAN_NPROC_CEILING = 32768

BASE_BUILD_TIMEOUT = 900.0
IMAGE_BUILD_TIMEOUT = 1800.0


def base_key(suite: str, packages: Sequence[str], mirror: str, sources: str) -> str:
    """A short name for one base rootfs: changes whenever what goes in does."""
    text = "\n".join([suite, mirror, *sorted(packages), sources])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def containers_conf(nofile: tuple[int, int], nproc: tuple[int, int]) -> str:
    """A containers.conf for podman here: runc, and ulimits nothing must raise."""
    limits = ", ".join(
        f'"{name}={soft}:{hard}"' for name, (soft, hard) in (("nofile", nofile), ("nproc", nproc))
    )
    return f'[containers]\ndefault_ulimits = [{limits}]\n\n[engine]\nruntime = "runc"\n'


def current_limits() -> tuple[tuple[int, int], tuple[int, int]]:
    """(nofile, nproc) as (soft, hard) for containers: what this process has."""

    def finite(limit: int, ceiling: int) -> int:
        return ceiling if limit == resource.RLIM_INFINITY else min(limit, ceiling)

    nofile_soft, nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc_soft, nproc_hard = resource.getrlimit(resource.RLIMIT_NPROC)
    nofile = (finite(nofile_soft, 1 << 20), finite(nofile_hard, 1 << 20))
    nproc_cap = PODMAN_NPROC_CEILING
    return nofile, (finite(nproc_soft, nproc_cap), finite(nproc_hard, nproc_cap))


def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]


class Podman:
    """``podman`` with this module's containers.conf; raises with its output on failure."""

    def __init__(self, conf_path: Path) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf_path)}

    def run(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", "--runtime", "runc", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"podman {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            )
        return done

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0


def write_containers_conf(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "containers.conf"
    path.write_text(containers_conf(*current_limits()))
    return path


def base_tarball(cache_dir: Path = CACHE_DIR) -> Path:
    """The cached base rootfs tarball, made with debootstrap if missing (about a minute)."""
    key = base_key(BASE_SUITE, BASE_PACKAGES, DEBIAN_MIRROR, DEBIAN_SOURCES)
    tarball = cache_dir / f"{BASE_SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    rootfs = cache_dir / f"rootfs-{key}.partial"
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
         BASE_SUITE, str(rootfs), DEBIAN_MIRROR],
        check=True, capture_output=True, timeout=BASE_BUILD_TIMEOUT,
    )  # fmt: skip
    for relative in BASE_PRUNE:
        for child in (rootfs / relative).glob("*"):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(DEBIAN_SOURCES)
    partial = tarball.with_suffix(".tar.partial")
    subprocess.run(
        ["tar", "--numeric-owner", "-C", str(rootfs), "--exclude=./dev/*", "--exclude=./proc/*",
         "--exclude=./sys/*", "-cf", str(partial), "."],
        check=True, capture_output=True,
    )  # fmt: skip
    partial.rename(tarball)  # only a complete tarball is ever found by name
    shutil.rmtree(rootfs)
    return tarball


def ensure_base_image(podman: Podman, cache_dir: Path = CACHE_DIR) -> str:
    """The base image's name, imported from the cached tarball if podman lacks it."""
    tarball = base_tarball(cache_dir)
    name = f"localhost/cefmp4-base:{tarball.stem}"
    if not podman.image_exists(name):
        podman.run("import", "--change", 'CMD ["/bin/bash"]', str(tarball), name, timeout=300)
    return name


def build_wheels(dest: Path = WHEELS_DIR) -> None:
    """Wheels of the project and its dependencies, at the versions installed here.

    ``async-timeout`` is added for bases whose Python is older than 3.11.3
    (bookworm's 3.11.2): redis requires it there, and pip evaluates that
    marker for the host's Python, which may be newer.
    """
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    constraints = dest.parent / "image-constraints.txt"
    constraints.write_text(freeze.stdout)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "-c", str(constraints), "-w", str(dest), str(REPO), "async-timeout"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip


def build_image(podman: Podman, base: str, tag: str) -> None:
    """``deploy/Dockerfile`` built from ``base``; docker format keeps HEALTHCHECK."""
    podman.run(
        "build", "--format", "docker", "--network", "host", "--build-arg", f"BASE={base}",
        "-f", str(REPO / "deploy" / "Dockerfile"), "-t", tag, str(REPO),
        timeout=IMAGE_BUILD_TIMEOUT,
    )  # fmt: skip
