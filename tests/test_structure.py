"""The house rules, checked from the source (issue 28): layers point one way, no import cycle, imports at the top
(lazy only for optional dependencies), no private names of other modules or of dependencies, files readable in
one sitting, and the top-level `kernels/` folder never shadows the PyPI package `kernels`."""
import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "minidit"
MAX_LINES = 450
# first-party modules that may be imported inside a function: they need an optional dependency (triton)
# minidit.cli.commands (imports torch): imported by minidit.cli.main only after the arguments parse, so that
# `minidit --help` and usage errors answer without waiting seconds for torch (issue 25; tests/test_cli_checks.py)
LAZY_OK = {"minidit.kernels.ref_attention", "minidit.cli.commands", "minidit.eval.command"}
OPTIONAL = {"triton", "sentencepiece", "tokenizers"}  # third-party packages that may be imported lazily


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = ["minidit", *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> list[tuple[str, bool, list[str]]]:
    """(imported module, at module level?, imported names) of every import in a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = set(id(n) for n in tree.body)
    top |= {id(s) for n in tree.body if isinstance(n, ast.If) for s in n.body}  # `if TYPE_CHECKING:` style
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names = [a.name for a in node.names]
            out.append((mod, id(node) in top, names))
            # `from . import x` / `from .cli import record`: x may be a submodule
            out += [(f"{mod}.{n}", id(node) in top, []) for n in names if f"{mod}.{n}" in MODULES]
    return out


MODULES = modules()
GRAPH = {m: {i for i, _, _ in imports(m, p) if i in MODULES and i != m} for m, p in MODULES.items()}


def library(m: str) -> bool:
    return not (m in ("minidit.cli", "minidit.__main__") or m.startswith(("minidit.cli.", "minidit.eval")))


def test_no_import_cycle():
    seen, stack, cycles = {}, [], []

    def visit(m):
        seen[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own submodules (the package's __init__ re-exports)
            if seen.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in seen:
                visit(n)
        stack.pop()
        seen[m] = "done"

    for m in sorted(GRAPH):
        if m not in seen:
            visit(m)
    assert not cycles, cycles


def test_library_never_imports_the_cli_the_eval_tools_or_the_training_tools():
    for m, deps in GRAPH.items():
        if library(m) and m != "minidit":
            bad = [d for d in deps if not library(d) or d.startswith("minidit.weights")]
            assert not bad, (m, bad)
    src = [(m, p) for m, p in MODULES.items() if library(m)]
    for m, p in src:  # also no absolute `minidit.weights` / `minidit.cli` import the graph would not see
        for mod, _, _ in imports(m, p):
            mod = mod or ""  # (minidit.clip is not minidit.cli)
            assert not (mod == "minidit.cli" or mod.startswith(("minidit.weights", "minidit.cli."))), (m, mod)


def test_imports_at_the_top_except_optional_dependencies():
    for m, p in MODULES.items():
        for mod, at_top, _ in imports(m, p):
            if at_top or mod is None:
                continue
            first_party = mod.startswith("minidit")
            assert (mod in LAZY_OK) if first_party else mod.split(".")[0] in OPTIONAL, (m, mod)


def test_no_private_names_of_other_modules_or_dependencies():
    for m, p in MODULES.items():
        tree = ast.parse(p.read_text())
        for mod, _, names in imports(m, p):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, (m, mod, private)
        imported = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                raise AssertionError(f"{m}: {node.value.id}.{node.attr} (line {node.lineno}) is another module's "
                                     "private name")


def test_every_module_reads_in_one_sitting():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_this_check_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above are not vacuous: the same graph code flags a planted cycle and a library -> CLI import."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {**saved, "minidit.sampling": saved["minidit.sampling"] | {"minidit.pipeline"}}
        try:
            test_no_import_cycle()
        except AssertionError:
            pass
        else:
            raise AssertionError("a planted cycle sampling -> pipeline -> sampling was not found")
        GRAPH = {**saved, "minidit.masks": saved["minidit.masks"] | {"minidit.cli.record"}}
        try:
            test_library_never_imports_the_cli_the_eval_tools_or_the_training_tools()
        except AssertionError:
            pass
        else:
            raise AssertionError("a planted masks -> cli.record import was not found")
    finally:
        GRAPH = saved


def test_transformers_imports_from_the_repository_root():
    """transformers >= 5.25 imports the PyPI package `kernels`; the repository's `kernels/` folder (not a regular
    package) must not shadow it when Python runs in the checkout, and minidit.kernels must still import."""
    code = ("import kernels, transformers; from transformers import PreTrainedModel, CLIPModel; "
            "import minidit.kernels.ref_attention as k; "
            "assert 'site-packages' in kernels.__file__ or 'dist-packages' in kernels.__file__, kernels.__file__; "
            "print(Path(k.__file__).resolve())")
    r = subprocess.run([sys.executable, "-c", "from pathlib import Path; " + code], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()) == (ROOT / "kernels" / "ref_attention.py").resolve()
    assert not (ROOT / "kernels" / "__init__.py").exists()
