"""The package's layering, as the README's code map states it: data, models, files and the predictor
know nothing about processes or training; nothing imports a command; every module says what it is for."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tl_dist"
# (folder or module) -> what it must never import
NEVER = {
    "data": ("accelerate", "tl_dist.distributed", "tl_dist.training", "tl_dist.commands"),
    "models": ("accelerate", "tl_dist.distributed", "tl_dist.training", "tl_dist.commands", "tl_dist.data"),
    "files": ("accelerate", "tl_dist.distributed", "tl_dist.training", "tl_dist.commands", "tl_dist.data"),
    "predictor.py": ("accelerate", "tl_dist.distributed", "tl_dist.training", "tl_dist.commands"),
    "training": ("tl_dist.commands",),
}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def modules(where: str) -> list[Path]:
    p = PKG / where
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


@pytest.mark.parametrize("where", sorted(NEVER))
def test_lower_layers_never_import_upper_ones(where):
    for path in modules(where):
        bad = sorted(m for m in imports(path) for banned in NEVER[where] if m == banned or m.startswith(banned + "."))
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_every_module_says_what_it_is_for():
    for path in sorted(PKG.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 20, f"{path.relative_to(PKG)} has no docstring"


def test_no_function_on_the_training_path_is_longer_than_a_screen():
    for path in modules("training"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 60, f"{path.name}: {node.name} is {node.end_lineno - node.lineno + 1} lines"
