"""The import direction between layers: encoders <- data <- models.

``vlcompress.encoders`` (frozen unimodal encoders) is the lowest of the three and imports
neither ``vlcompress.models`` nor ``vlcompress.data``; ``vlcompress.data`` never imports
``vlcompress.models``. Read from the source with :mod:`ast` (every import statement, those inside
functions included, relative ones resolved), so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vlcompress"

# layer -> the packages it must not import
FORBIDDEN = {
    "data": ("vlcompress.models",),
    "encoders": ("vlcompress.models", "vlcompress.data"),
}


def _module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module that ``source`` (the text of ``module``) imports: ``import a.b`` -> ``a.b``;
    ``from a import b`` -> ``a`` and ``a.b`` (``b`` may be a submodule); relative imports
    resolved against ``module``; ``importlib.import_module("a.b")`` with a constant name."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def _violations(layer: str) -> list[str]:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"no Python files under {PACKAGE / layer}"
    bad = []
    for file in files:
        module = _module_name(file)
        imports = imported_modules(file.read_text(), module, file.name == "__init__.py")
        for name in sorted(imports):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{file.relative_to(PACKAGE.parent)} imports {name}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_lower_layer_never_imports_a_higher_one(layer):
    bad = _violations(layer)
    assert not bad, (
        f"vlcompress/{layer} must not import {' or '.join(FORBIDDEN[layer])}: "
        + "; ".join(bad)
        + ". Move the shared piece down (an image/text encoder to vlcompress/encoders, "
        "a batch or file format to vlcompress/data) and import it from there."
    )


def test_the_checker_sees_every_kind_of_import():
    """A checker that finds nothing would pass vacuously: each form is recognised."""
    src = (
        "import vlcompress.models.clip_vil\n"
        "from vlcompress import models\n"
        "def f():\n"
        "    from ..models.clip_vil import CLIPViL\n"
        "    from . import text\n"
        "importlib.import_module('vlcompress.models.lxmert')\n"
    )
    found = imported_modules(src, "vlcompress.data.clip_grid")
    assert {
        "vlcompress.models.clip_vil",
        "vlcompress.models",
        "vlcompress.models.clip_vil.CLIPViL",
        "vlcompress.data.text",
        "vlcompress.models.lxmert",
    } <= found
    in_package = imported_modules("from ..models import x", "vlcompress.encoders", True)
    assert "vlcompress.models" in in_package
