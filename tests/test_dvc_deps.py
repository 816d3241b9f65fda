"""dvc.yaml's ``deps`` list every project module a stage's command imports, and nothing else.

DVC re-runs a stage only when one of its deps changes, so a module missing from them is a code
change that silently leaves stale stores or results behind. For each stage the test computes
the project modules that ``sidecache stage NAME`` can import: the ``sidecache`` console script
(pyproject.toml) and its module-level imports, ``stages.stage`` (which it loads by name), the
module-level imports of ``stages/stage.py`` and the imports inside ``cmd_NAME`` and the functions
of ``stages/stage.py`` it calls; from there, every import of every project module reached,
module-level and inside functions, plus the packages (``__init__.py``) above each one. A dep
that is a folder (``storage``, ``pipeline/sidenets``) covers the files under it.
"""

from __future__ import annotations

import ast
import tomllib
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "storage")
STAGES = ("cache", "train", "evaluate", "report")
# the console script loads this module with importlib for `sidecache stage ...`
STAGE_MODULE = "stages.stage"


def module_file(name: str) -> Path | None:
    """The file of project module ``name``, or None for anything else (a name inside a module)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def walk(nodes: Iterable[ast.AST]) -> Iterator[ast.AST]:
    """Every node under ``nodes``, skipping ``if TYPE_CHECKING:`` bodies (never run)."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        yield node
        if is_type_checking(node):
            assert isinstance(node, ast.If)
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported(nodes: Iterable[ast.AST], module: str) -> set[str]:
    """Project modules imported under ``nodes`` of ``module``'s source (with their packages)."""
    path = module_file(module)
    package = (
        module if path is not None and path.name == "__init__.py" else module.rpartition(".")[0]
    )
    names: set[str] = set()
    for node in walk(nodes):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return with_packages(names)


def with_packages(names: Iterable[str]) -> set[str]:
    """The project modules among ``names`` and the packages above them (importing a.b runs a)."""
    found = set()
    for name in names:
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        found.update(prefix for prefix in prefixes if module_file(prefix) is not None)
    return found


def parse(module: str) -> ast.Module:
    path = module_file(module)
    assert path is not None, f"expected project module {module}, found no file for it"
    return ast.parse(path.read_text(), filename=str(path))


def stage_imports(stage: str) -> set[str]:
    """What ``stages/stage.py`` imports for STAGE: module level, ``cmd_STAGE`` and its helpers."""
    tree = parse(STAGE_MODULE)
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    top = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
    assert f"cmd_{stage}" in funcs, (
        f"expected {STAGE_MODULE} to run stage {stage!r} with a function cmd_{stage}, found "
        f"{sorted(funcs)}; update stage_imports in this test"
    )
    reached, todo = set(), [f"cmd_{stage}"]
    while todo:  # cmd_STAGE and the functions of stages/stage.py it calls, transitively
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo.extend(
            n.func.id
            for n in ast.walk(funcs[name])
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in funcs
        )
    return imported([*top, *(funcs[name] for name in reached)], STAGE_MODULE)


def entry_imports() -> tuple[str, set[str]]:
    """The ``sidecache`` console script's module and what it imports for ``sidecache stage``."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = str(scripts["sidecache"]).partition(":")[0]
    tree = parse(entry)
    constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert STAGE_MODULE in constants, (
        f"expected {entry} (the sidecache console script) to name {STAGE_MODULE!r} for "
        "`sidecache stage`, found no such string; update STAGE_MODULE in this test"
    )
    return entry, imported(tree.body, entry) | with_packages([STAGE_MODULE])


def closure(stage: str) -> dict[Path, list[str]]:
    """Every project module file ``sidecache stage STAGE`` can import, with an import chain."""
    entry, first = entry_imports()
    chains = {name: [name] for name in with_packages([entry])}
    todo = deque(sorted(chains))
    while todo:
        module = todo.popleft()
        if module == entry:
            found = first
        elif module == STAGE_MODULE:
            found = stage_imports(stage)
        else:
            found = imported(parse(module).body, module)
        for name in sorted(found - chains.keys()):
            chains[name] = [*chains[module], name]
            todo.append(name)
    files: dict[Path, list[str]] = {}
    for name, chain in chains.items():
        path = module_file(name)
        assert path is not None
        files[path.relative_to(ROOT)] = chain
    return files


def code_deps(stage: str) -> list[Path]:
    """The stage's deps inside the project's packages (modules or folders of them)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = spec.get("do", spec).get("deps", [])
    return [Path(d) for d in deps if Path(d).parts[0] in PACKAGES]


def covers(dep: Path, path: Path) -> bool:
    return path == dep or dep in path.parents


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_the_stage_import_closure(stage: str) -> None:
    files, deps = closure(stage), code_deps(stage)
    missing = [
        f"{path} ({' -> '.join(chain)})"
        for path, chain in sorted(files.items())
        if not any(covers(dep, path) for dep in deps)
    ]
    assert not missing, (
        f"dvc.yaml stage {stage!r}: expected its deps to cover every project module its command "
        "imports, found these missing (add them to its deps):\n  " + "\n  ".join(missing)
    )


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_code_deps_exist_and_are_imported(stage: str) -> None:
    files, deps = closure(stage), code_deps(stage)
    gone = [str(d) for d in deps if not (ROOT / d).exists()]
    assert not gone, (
        f"dvc.yaml stage {stage!r}: expected every dep to exist (dvc repro stops on a missing "
        f"one), found no {gone}; the module moved or was removed: update its deps"
    )
    unused = [str(d) for d in deps if not any(covers(d, p) for p in files)]
    assert not unused, (
        f"dvc.yaml stage {stage!r}: expected only modules its command imports in its deps, "
        f"found {unused} (a change there re-runs the stage for nothing): remove them"
    )
