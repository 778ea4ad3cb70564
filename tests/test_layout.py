"""The package's layers: each module imports only from its own layer, the layers below and the base."""

import ast
import pathlib

import fprobe

PACKAGE = pathlib.Path(fprobe.__file__).parent
LAYERS = {"": 0, "model": 1, "rl": 2, "sampling": 2, "entropy": 3, "trl": 4, "cli": 4}


def layer_of(module: str) -> str:
    """'fprobe.model.policy' -> 'model'; a base module ('fprobe.tree') -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else ""


def imported_fprobe_modules(path: pathlib.Path) -> set[str]:
    """Every fprobe module (or subpackage) that ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fprobe"):
            found |= {f"{node.module}.{alias.name}" if node.module in ("fprobe", *(f"fprobe.{l}" for l in LAYERS if l)) else node.module
                      for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fprobe")}
    return found


def test_modules_import_only_their_own_layer_the_layers_below_and_the_base():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = "fprobe." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module in ("fprobe.__init__", "fprobe.__main__"):
            continue
        own = layer_of(module)
        for imported in imported_fprobe_modules(path):
            other = layer_of(imported)
            if other != own and LAYERS[other] >= LAYERS[own] and other != "":
                wrong.append(f"{module} imports {imported}")
    assert not wrong, wrong


def test_every_public_name_is_exported_and_every_warning_is_public():
    import fprobe.warnings as fw

    assert all(hasattr(fprobe, name) for name in fprobe.__all__)
    warning_classes = [name for name, value in vars(fw).items() if isinstance(value, type) and issubclass(value, Warning)
                       and value.__module__ == fw.__name__]
    assert warning_classes and all(name in fprobe.__all__ for name in warning_classes)
