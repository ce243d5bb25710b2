"""The package's layering, read from the source with `ast`: imports run one way, and family knowledge stays in
teachers/. Imports inside functions count too: a late import is still a dependency."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "teachers", "students", "discriminators")
UPPER = {"distill.api", "distill.trainer", "distill.evaluation", "distill.bench", "distill.exporting", "distill.cli",
         "distill.runs"}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (`from distill import x` counts as distill.x where that is a module)."""
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_imports_have_no_cycles():
    graph = _graph()
    assert len(graph) > 30  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_is_found_where_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ["teachers", "students", "discriminators"])
def test_lower_packages_import_no_command(package):
    graph = _graph()
    bad = {m: sorted(graph[m] & UPPER) for m in graph if m.split(".")[0] == package and graph[m] & UPPER}
    assert not bad, bad


def test_config_is_a_leaf():
    graph = _graph()
    assert graph["distill.config"] <= {"distill.errors", "distill.paths"}  # paths: another leaf
    assert graph["distill.paths"] <= {"distill.errors"}


def _code_words(path: Path):
    """(line, text) of every identifier and string in a module's code, leaving out its prose: docstrings, comments
    (not in the AST at all) and argparse help and description texts."""
    tree = ast.parse(path.read_text())
    prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    prose |= {id(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords
              if k.arg in ("help", "description")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            yield node.lineno, node.value
        elif isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, ast.Compare) and any(isinstance(c, ast.Attribute) and c.attr == "family"
                                                   for c in [node.left, *node.comparators]):
            yield node.lineno, "family =="


# The one default that names a family: the teacher a config gets when it names none (a config value).
ALLOWED = {("distill/config.py", "builtin:tiny-sdxl")}


def test_family_names_live_in_teachers():
    """No code outside teachers/ names a family or tests which family a teacher is: what differs between families
    is a teacher attribute. Prose (docstrings, comments, help texts) may name them."""
    words = re.compile(r"(^|[^a-z])(sdxl|sd3)([^a-z0-9]|$)|^family ==$", re.IGNORECASE)
    hits = [f"{p.relative_to(ROOT)}:{line}: {text!r}"
            for pkg in ("distill", "students", "discriminators") for p in sorted((ROOT / pkg).rglob("*.py"))
            for line, text in _code_words(p)
            if words.search(text) and (str(p.relative_to(ROOT)), text) not in ALLOWED]
    assert not hits, "\n".join(hits)


def test_make_teacher_offers_every_builder():
    import teachers
    from teachers import real_size, tiny

    assert list(teachers.MAKEABLE) == [*tiny.BUILDERS, *real_size.ARCHITECTURES]
