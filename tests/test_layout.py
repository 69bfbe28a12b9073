"""The package's folders follow the way a value travels (docs/architecture.md): a module imports only
modules of its own folder or of folders before it in the flow, and foreign libraries stay behind the folder
that owns them. Read from the source with ``ast``, so the rule stays true as modules are added."""

from __future__ import annotations

import ast
from pathlib import Path

import pistream

PACKAGE = Path(pistream.__file__).parent

# Rank of each part of the package in the flow: a module may import ranks up to its own.
HELPERS = {"errors", "backoff", "timeutil", "config", "configfile", "logsetup", "__init__"}
FOLDERS = {"pi": 1, "stream": 2, "lake": 3}
COMPOSITION = {"pipeline", "cli", "check", "__main__", "metrics", "streamstats", "backfill", "progressview", "livebackfill"}
SIMULATOR = 1  # the simulator stands beside the PI side: it may use pi's WebID and time helpers only


def part_of(module: str) -> str:
    """``pistream.pi.channel`` -> ``pi``; ``pistream.errors`` -> ``errors``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank(module: str) -> int:
    part = part_of(module)
    if part in FOLDERS:
        return FOLDERS[part]
    if part == "sim":
        return SIMULATOR
    if part in HELPERS:
        return 0
    if part in COMPOSITION:
        return 4
    raise AssertionError(f"{module}: a top-level module the layout rule does not know; add it to a rank")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def imports_of(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for every import of the file, relative ones resolved, including imports inside
    functions (pistream imports much lazily)."""
    name = name or module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
                if node.module is None:  # from . import x: each name may be a module
                    found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
                    continue
                found.append((node.lineno, target))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def own_module(imported: str) -> str | None:
    """The pistream module an import names, reduced to one the rank rule knows (a name imported from a
    package, like ``from . import __version__``, counts as the package)."""
    if imported != "pistream" and not imported.startswith("pistream."):
        return None
    parts = imported.split(".")
    if len(parts) >= 3 and parts[1] in {*FOLDERS, "sim"}:
        return ".".join(parts[:3])
    if len(parts) >= 2 and (PACKAGE / f"{parts[1]}.py").exists() or len(parts) >= 2 and parts[1] in FOLDERS:
        return ".".join(parts[:2])
    return "pistream"


def all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_folders_read_as_the_pipeline():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} >= {"pi", "stream", "lake",
                                                                                           "sim"}
    for folder in (*FOLDERS, "sim"):
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"pistream/{folder}/__init__.py must say what the folder owns"


def test_no_module_imports_one_after_it_in_the_flow():
    wrong = []
    for path in all_modules():
        here = module_name(path)
        for line, imported in imports_of(path):
            target = own_module(imported)
            if target is None or target == "pistream":
                continue
            if rank(target) > rank(here):
                wrong.append(f"{here}:{line} imports {imported}")
            if part_of(target) == "sim" and part_of(here) in FOLDERS:
                wrong.append(f"{here}:{line} imports the simulator")
    assert wrong == []


def test_foreign_libraries_stay_in_their_folder():
    owners = {"deltalake": {"lake"}, "h11": {"pi", "sim", "metrics"}, "wsproto": {"sim"}, "spnego": {"pi"},
              "httpx": {"pi", "lake"}}
    wrong = []
    for path in all_modules():
        here = module_name(path)
        part = part_of(here)
        for line, imported in imports_of(path):
            library = imported.split(".")[0]
            if library in owners and part not in owners[library]:
                wrong.append(f"{here}:{line} imports {library}")
    assert wrong == []


def test_the_rule_sees_a_wrong_import(tmp_path):
    """The check above can fail: an import from stream/ into pi/ is found as one."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..stream.buffer import ColumnBuffer\n\ndef f():\n    from ..lake import sink\n",
                     encoding="utf-8")
    found = [own_module(imported) for _, imported in imports_of(probe, "pistream.pi.probe")]
    assert found == ["pistream.stream.buffer", "pistream.lake"]
    assert all(rank(target or "") > rank("pistream.pi.probe") for target in found)
