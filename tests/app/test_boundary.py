"""The stated boundary inside app/: the HTTP side never imports torch, the service side never
imports the web framework. Checked on the source (every import statement, at any depth in a
module), so a violation fails here before it can hide behind an indirect import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def modules(side: str) -> list[Path]:
    found = sorted((APP / side).rglob("*.py"))
    assert len(found) >= 5, f"app/{side} has too few modules: {found}"
    return found


@pytest.mark.parametrize(
    "path", modules("http") + modules("grpc_api"), ids=lambda p: str(p.relative_to(APP))
)
def test_protocol_sides_never_import_torch(path: Path) -> None:
    """The HTTP side and the gRPC side (an adapter onto the same calls) alike."""
    assert not imported_roots(path) & {"torch", "torchvision"}


@pytest.mark.parametrize("path", modules("service"), ids=lambda p: str(p.relative_to(APP)))
def test_service_side_never_imports_the_web_framework(path: Path) -> None:
    assert not imported_roots(path) & {"fastapi", "starlette", "uvicorn", "app"} - {"app"}
    assert not any(name.startswith(("app.http", "app.grpc_api")) for name in _app_imports(path)), (
        "the service side must not import the HTTP or gRPC side"
    )


def _app_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_checker_sees_a_nested_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import torch.nn as nn\n    from starlette import x\n")
    assert {"torch", "starlette"} <= imported_roots(module)


def eager_imports(path: Path) -> set[str]:
    """Root packages a module imports when it is imported: its top-level statements, outside
    functions and `if TYPE_CHECKING:` blocks."""
    roots: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try | ast.With):
                visit(node.body)

    visit(ast.parse(path.read_text(), str(path)).body)
    return roots


TRACED = [*modules("service"), APP / "tracing.py", APP / "main.py", *modules("http")]


@pytest.mark.parametrize("path", TRACED, ids=lambda p: str(p.relative_to(APP)))
def test_opentelemetry_is_imported_only_when_tracing_is_on(path: Path) -> None:
    """Tracing is an optional extra: apart from the middleware that only a traced app installs,
    no module imports opentelemetry on import, so the app runs without it."""
    if path == APP / "http" / "trace_context.py":
        return
    assert "opentelemetry" not in eager_imports(path)
