"""The layers in the tree are the layers in the imports.

Each package may import only the layers below it (see each ``__init__.py``):
domain (with the pure fold ``projections.streams``) < adapters < projections <
consumers < runtime < ops < dev < the command line (``cefmp4.cli``). A module
that reaches up is a design change and should fail here first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["domain", "adapters", "projections", "consumers", "runtime", "ops", "dev", "cli"]
OURS = ("cefmp4", "consumers", "projections")


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module == "projections.streams":
        return "domain"
    if parts[0] == "cefmp4":
        # cefmp4.<layer>.<module>; cefmp4, cefmp4.cli and cefmp4.__main__ are the top.
        return parts[1] if len(parts) > 1 and parts[1] in ORDER else "cli"
    return parts[0]


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in OURS:
        for path in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] in OURS)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in OURS:
                continue
            for alias in node.names:
                # ``from cefmp4.domain import events`` imports the module
                # cefmp4.domain.events; ``from cefmp4.domain.events import X``
                # imports cefmp4.domain.events.
                candidate = f"{node.module}.{alias.name}"
                names.add(candidate if candidate in MODULES else node.module)
    return names


MODULES = modules()


def test_every_module_is_in_a_layer() -> None:
    loose = [m for m in MODULES if m.startswith("cefmp4.") and layer_of(m) not in ORDER]
    top = [m for m in MODULES if m.count(".") == 1 and m.startswith("cefmp4.")]
    assert not loose, loose
    # Only the entry points sit at the top of cefmp4/.
    assert sorted(top) == [
        "cefmp4.__main__",
        "cefmp4.adapters",
        "cefmp4.cli",
        "cefmp4.dev",
        "cefmp4.domain",
        "cefmp4.ops",
        "cefmp4.runtime",
    ]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    here = layer_of(module)
    if module in {"cefmp4", "cefmp4.__main__"}:
        return
    upward = sorted(
        target
        for target in imports_of(MODULES[module])
        if target in MODULES and ORDER.index(layer_of(target)) > ORDER.index(here)
    )
    assert not upward, f"{module} ({here}) imports from a higher layer: {upward}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    # The rule above must be able to fail: a domain module importing an adapter.
    bad = tmp_path / "bad.py"
    bad.write_text("from cefmp4.adapters.files import look\nimport cefmp4.runtime.service\n")
    found = imports_of(bad)
    assert found == {"cefmp4.adapters.files", "cefmp4.runtime.service"}
    assert all(ORDER.index(layer_of(t)) > ORDER.index("domain") for t in found)


def test_domain_imports_no_io_library() -> None:
    io_libraries = {
        "redis",
        "aioboto3",
        "aiobotocore",
        "botocore",
        "boto3",
        "watchfiles",
        "prometheus_client",
        "structlog",
        "platform",
        "dotenv",
        "asyncio",
        "socket",
        "subprocess",
    }
    for module, path in MODULES.items():
        if layer_of(module) != "domain":
            continue
        used: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                used.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                used.add(node.module.split(".")[0])
        assert not used & io_libraries, f"{module} imports {sorted(used & io_libraries)}"
