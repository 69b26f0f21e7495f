"""docs/architecture.md's drawing of what imports what is the code's: `drawing()` draws it from the modules' own
import lines, and the document must hold exactly that (`python tests/test_architecture.py` rewrites it there)."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
TOP = " notebooks/NN_*.py   bench/*.py   tests/*.py\n " + "─" * 94


def project_imports(module: str, top_only: bool = False) -> set[str]:
    """The project modules that `module` imports, wherever in it (with `top_only`, outside functions and classes)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    found = set()
    for node in tree.body if top_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found & set(MODULES)


def drawing() -> str:
    """One line a module, with the project modules it imports: a module above all it imports (its floor is one
    more than theirs), so an arrow never points up; on one floor, the module importing more first."""
    imports = {module: project_imports(module) for module in MODULES}
    floors = {}
    while len(floors) < len(MODULES):
        ready = [m for m in MODULES if m not in floors and imports[m] <= set(floors)]
        assert ready, f"an import cycle among {sorted(set(MODULES) - set(floors))}"
        for module in ready:
            floors[module] = 1 + max((floors[m] for m in imports[module]), default=-1)

    def order(modules):
        return sorted(modules, key=lambda m: (-floors[m], -len(imports[m]), m))

    lines = [f" {module + '.py':<19} ──► {', '.join(order(imports[module]))}"
             for module in order(m for m in MODULES if imports[m])]
    leaves = ", ".join(f"{m}.py" for m in order(m for m in MODULES if not imports[m]))
    return "\n".join([TOP, *lines, f" {leaves}   (no project imports)"])


def drawn() -> str:
    """The drawing in docs/architecture.md: the code block under "What imports what"."""
    return DOC.read_text().split("## What imports what", 1)[1].split("```\n", 2)[1].rstrip("\n")


def test_docs_architecture_draws_the_imports_of_the_code():
    assert drawn() == drawing(), "docs/architecture.md's drawing is stale: python tests/test_architecture.py"


def test_every_project_import_is_at_the_top_of_its_module():
    """What a module needs of the project shows in its first lines (third-party libraries may wait for the function
    that needs them, so that importing a module stays quick)."""
    inside = {module: project_imports(module) - project_imports(module, top_only=True) for module in MODULES}
    assert not {module: names for module, names in inside.items() if names}


if __name__ == "__main__":  # write the drawing into docs/architecture.md
    text = DOC.read_text()
    DOC.write_text(text.replace(drawn(), drawing()))
    sys.exit(print(drawing()))
