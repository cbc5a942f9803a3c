"""The package's shape: no import cycles between its modules, and modules short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "webhook"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The package's own modules that ``name`` imports anywhere in its body (lazy imports too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {target for target in found if target in MODULES and target != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_imports() -> None:
    graph = {name: imports_of(name) for name in MODULES}
    assert "webhook.ledger.schema" in graph["webhook.ledger.queue"]
    assert "webhook.sinks.options" in graph["webhook.sinks.registry"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    graph = {name: imports_of(name) for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_read_in_one_sitting(name: str) -> None:
    limit = 250 if name.startswith("webhook.ledger") else 400
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= limit, f"{MODULES[name]} has {lines} lines (at most {limit})"


# -- The architecture's rules: the tree reads as the flow, and its boundaries hold ------------------

TOP_LEVEL_LIMIT = 8
DATABASE_LIBRARIES = {"sqlalchemy", "alembic", "psycopg", "sqlite3"}
SDK = "qcloud_cos"
# Where the SDK may be imported: CI's own package, the sink that writes to COS, and the stand-in.
SDK_USERS = ("webhook.ci", "webhook.sinks.cos", "webhook.dev")
# The one command module that starts the sandbox and the demo.
DEV_COMMANDS = "webhook.cli.dev"
RECORD_PATH = "webhook.intake.record"
# What configuration may import: how values are read, and the pure validation of sink tables.
CONFIG_IMPORTS = {
    "webhook.config_values",
    "webhook.errors",
    "webhook.retry",
    "webhook.models",
    "webhook.sinks.config",
    "webhook.sinks.options",
    "webhook.sinks.registry",
}


def external_imports(name: str) -> set[str]:
    """The top-level names of the libraries ``name`` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - {"webhook"}


def within(name: str, *packages: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def test_the_rules_see_library_imports() -> None:
    assert "sqlalchemy" in external_imports("webhook.ledger.engine")
    assert SDK in external_imports("webhook.ci.client")
    assert within("webhook.ledger.jobs", "webhook.ledger")
    assert not within("webhook.ledgers", "webhook.ledger")


def test_at_most_eight_modules_at_the_top() -> None:
    top = sorted(path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    assert len(top) <= TOP_LEVEL_LIMIT, f"{len(top)} modules at the top of webhook/: {', '.join(top)}"


def test_only_the_ledger_touches_the_database() -> None:
    leaks = {
        name: sorted(external_imports(name) & DATABASE_LIBRARIES)
        for name in MODULES
        if not within(name, "webhook.ledger") and external_imports(name) & DATABASE_LIBRARIES
    }
    assert leaks == {}


def test_the_tables_stay_in_the_ledger() -> None:
    private = {"webhook.ledger.schema", "webhook.ledger.engine", "webhook.ledger.errors"}
    leaks = {name: sorted(imports_of(name) & private) for name in MODULES if not within(name, "webhook.ledger")}
    assert {name: found for name, found in leaks.items() if found} == {}


def test_the_ledger_depends_on_nothing_but_the_typed_records() -> None:
    outside = {
        name: sorted(target for target in imports_of(name) if not within(target, "webhook.ledger", "webhook.models"))
        for name in MODULES
        if within(name, "webhook.ledger")
    }
    assert {name: found for name, found in outside.items() if found} == {}


def test_production_never_imports_the_sandbox() -> None:
    users = sorted(
        name
        for name in MODULES
        if not within(name, "webhook.dev", DEV_COMMANDS) and any(within(t, "webhook.dev") for t in imports_of(name))
    )
    assert users == []
    assert any(within(target, "webhook.dev") for target in imports_of(DEV_COMMANDS))  # the rule sees imports


def test_the_sdk_is_reached_through_ci() -> None:
    users = sorted(name for name in MODULES if SDK in external_imports(name) and not within(name, *SDK_USERS))
    assert users == []


def test_configuration_is_a_leaf() -> None:
    assert imports_of("webhook.config") <= CONFIG_IMPORTS
    assert SDK not in external_imports("webhook.config")


def test_one_path_records_a_callback() -> None:
    """Only the intake's record path asks the ledger to record a callback (``<ledger>.jobs.record(...)``)."""

    def records(name: str) -> bool:
        return any(
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "record"
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "jobs"
            for node in ast.walk(ast.parse(MODULES[name].read_text()))
        )

    assert sorted(name for name in MODULES if records(name)) == [RECORD_PATH]
