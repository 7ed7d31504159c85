"""The package's layout: no import circle between modules or between stages, no module over 800
lines (ARCHITECTURE.md). Imports are read with ``ast``, including those inside functions and under
``TYPE_CHECKING``: a lazy import is still an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "brainbag"
MAX_LINES = 800


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The brainbag modules ``path`` imports (``from brainbag.x import y`` counts as
    ``brainbag.x.y`` when that is a module, else as ``brainbag.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def subpackages(root: Path = PACKAGE) -> set[str]:
    return {n for n, p in modules(root).items() if p.name == "__init__.py" and "." in n}


def stage_graph(g: dict[str, set[str]], root: Path = PACKAGE) -> dict[str, set[str]]:
    """The graph between stages: a module's stage is its subpackage (brainbag.run.predict ->
    brainbag.run); the top-level modules (errors, files, the package itself) are the foundation,
    ``brainbag``; ``python -m brainbag`` (__main__) sits above them all."""
    subs = subpackages(root)

    def stage(name: str) -> str:
        if name == "brainbag.__main__":
            return name
        return next((s for s in subs if name == s or name.startswith(s + ".")), "brainbag")

    out: dict[str, set[str]] = {}
    for src, dsts in g.items():
        out.setdefault(stage(src), set()).update(stage(d) for d in dsts if stage(d) != stage(src))
    return out


def cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One circle in ``g`` (its nodes, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_between_modules() -> None:
    found = cycle(graph())
    assert found is None, "import circle: " + " -> ".join(found or [])


def test_no_import_circle_between_stages() -> None:
    found = cycle(stage_graph(graph()))
    assert found is None, "stages import each other in a circle: " + " -> ".join(found or [])


def test_no_module_over_800_lines() -> None:
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_every_stage_says_in_one_line_what_it_does() -> None:
    for name in subpackages():
        doc = ast.get_docstring(ast.parse((PACKAGE.parent / name.replace(".", "/") /
                                           "__init__.py").read_text(encoding="utf-8")))
        assert doc and doc.splitlines()[0].strip(), f"{name}/__init__.py has no docstring"


def test_the_checker_sees_a_circle(tmp_path: Path) -> None:
    """The checker itself: a planted circle a -> b -> a (one of them lazy) is found."""
    pkg = tmp_path / "brainbag"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text('"""A stage."""\n')
    (pkg / "sub" / "a.py").write_text("from brainbag.sub.b import f\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from brainbag.sub import a\n")
    (pkg / "low").mkdir()
    (pkg / "low" / "__init__.py").write_text('"""Another stage."""\n')
    (pkg / "low" / "c.py").write_text("import brainbag.sub.a\n")
    (pkg / "low" / "d.py").write_text("")
    (pkg / "sub" / "e.py").write_text("from brainbag.low import d\n")
    g = graph(pkg)
    assert cycle(g) == ["brainbag.sub.a", "brainbag.sub.b", "brainbag.sub.a"]
    g["brainbag.sub.b"] = set()  # no module circle left, but the stages still point both ways
    assert cycle(g) is None
    assert cycle(stage_graph(g, pkg)) in (["brainbag.low", "brainbag.sub", "brainbag.low"],
                                          ["brainbag.sub", "brainbag.low", "brainbag.sub"])
