"""The direction of imports: guest and host share facts only through proto.

``vtick.guest`` and ``vtick.host`` may import ``vtick.proto``; neither imports the other,
and ``vtick.proto`` imports neither.  Checked on the source (every ``import`` and
``from ... import`` statement, at any depth, including those inside functions), so a
lazy import inside a function is caught as well as one at the top.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "host": ("vtick.guest",),
    "guest": ("vtick.host",),
    "proto": ("vtick.host", "vtick.guest"),
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in imported_modules(path.read_text()):
            for prefix in FORBIDDEN[folder]:
                if module == prefix or module.startswith(prefix + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_flow_only_through_proto(folder: str) -> None:
    assert violations(folder) == []


def test_the_checker_catches_a_planted_import() -> None:
    planted = "def f():\n    from vtick.guest.smp import CPU_ONLINE\n"
    assert (2, "vtick.guest.smp") in imported_modules(planted)
    assert (1, "vtick.host") in imported_modules("import vtick.host")
    assert (1, "vtick.host.lab") in imported_modules("from vtick.host import lab")


def test_host_top_level_is_the_vmm() -> None:
    """What launches and measures the VMM lives in rooms next to it, not beside it."""
    top = {p.stem for p in (ROOT / "host").glob("*.py")} - {"__init__", "__main__"}
    assert top == {
        "accounting",
        "cli",
        "exitcost",
        "faults",
        "hrtimer",
        "machine",
        "mutations",
        "onlinemask",
        "results",
        "server",
    }
