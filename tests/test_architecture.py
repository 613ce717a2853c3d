"""The architecture contract (ARCHITECTURE.md): the import layers and the absence of import cycles
(``.importlinter``, checked by import-linter), no package file over 500 lines, and no module using another
module's private names."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nnunet_tpp"
MAX_LINES = 500


def test_the_import_contract_is_kept():
    run = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
         "--no-cache", "--no-logo", str(ROOT / ".importlinter")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"lint-imports failed:\n{run.stdout}\n{run.stderr}"


def test_no_package_file_exceeds_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module name of ``from <node.module> import ...`` inside ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def cross_module_private_uses() -> list[str]:
    """Every place a package module imports another module's private name (``from m import _x``) or reads one
    through a module object (``m._x``), as ``path:line: what``."""
    modules = _module_names()
    found = []
    for module, path in sorted(modules.items()):
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> package module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _absolute(module, node, path.name == "__init__.py")
                if not source.startswith("nnunet_tpp"):
                    continue
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                    elif _private(alias.name) and source != module:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {source} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("nnunet_tpp"):  # `import a.b` binds a; `import a.b as c` binds a.b
                        aliases[alias.asname or "nnunet_tpp"] = alias.name if alias.asname else "nnunet_tpp"
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            owner = _dotted(node.value)
            if owner is None:
                continue
            head, _, rest = owner.partition(".")
            if head not in aliases:
                continue
            target = aliases[head] + (f".{rest}" if rest else "")
            if target in modules and target != module:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = cross_module_private_uses()
    assert not found, ("private names used across modules (make them public, with a docstring, in the module "
                       "that owns them):\n" + "\n".join(found))


def test_the_private_name_scan_finds_what_it_looks_for(tmp_path, monkeypatch):
    package = tmp_path / "nnunet_tpp"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "low.py").write_text("def _helper():\n    pass\n")
    (package / "high.py").write_text("from nnunet_tpp.sub.low import _helper\nfrom nnunet_tpp.sub import low\n"
                                     "low._helper()\n")
    (package / "own.py").write_text("from nnunet_tpp.own import _x\n__all__ = []\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert cross_module_private_uses() == ["nnunet_tpp/high.py:1: from nnunet_tpp.sub.low import _helper",
                                           "nnunet_tpp/high.py:3: low._helper"]
