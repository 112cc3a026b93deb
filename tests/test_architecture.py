"""The layering CI holds the tree to: plugins use only the SDK, the core no plugin, no import cycles, and a
hook contract that changes only with its version."""

from __future__ import annotations

import ast
import configparser
import inspect
import json
from pathlib import Path

import pytest

from shimhub import hookspecs, hookspecs_v1, sdk

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parent.parent
CORE = ROOT / "shimhub"
PLUGINS = ROOT / "plugins"
SNAPSHOT = Path(__file__).parent / "data" / "hookspecs.json"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`, at any depth; names imported from a package count as modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _requires(distribution: Path) -> set[str]:
    """Top-level packages a plugin distribution may import: its own and those of the plugins it requires."""
    setup = configparser.ConfigParser()
    setup.read(distribution / "setup.cfg")
    required = setup["options"].get("install_requires", "").split()
    return {f"shimhub_{distribution.name}"} | {name.replace("-", "_") for name in required if name != "shimhub"}


def test_plugins_import_only_the_sdk() -> None:
    wrong = []
    for distribution in sorted(p.parent for p in PLUGINS.glob("*/setup.cfg")):
        allowed = _requires(distribution)
        for path in distribution.rglob("*.py"):
            in_tests = "tests" in path.relative_to(distribution).parts
            for line, module in _imports(path):
                top = module.split(".")[0]
                if top == "shimhub":
                    ok = module.startswith("shimhub.sdk") or (in_tests and module.startswith("shimhub.testing"))
                elif top.startswith("shimhub_") and top != "shimhub_proto":
                    ok = top in allowed
                else:
                    ok = True
                if not ok:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert wrong == [], "plugins may import shimhub.sdk, shimhub_proto and the plugins they require"


def test_the_core_imports_no_plugin() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in CORE.rglob("*.py")
        for line, module in _imports(path)
        if module.startswith("shimhub_") and not module.startswith("shimhub_proto")
    ]
    assert wrong == []


def test_no_import_cycle_in_the_core() -> None:
    """Every import counts, including those only for type checking and those inside functions."""
    modules = {_module_name(path): path for path in CORE.rglob("*.py")}
    graph = {
        name: {m for _, m in _imports(path) if m in modules and m != name}
        | {m.rsplit(".", 1)[0] for _, m in _imports(path) if m not in modules and m.rsplit(".", 1)[0] in modules}
        - {name}
        for name, path in modules.items()
    }
    # a package's __init__ runs before its modules anyway: an edge to one's own parent package is no cycle
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    done: set[str] = set()

    def walk(name: str, trail: list[str]) -> None:
        if name in trail:
            pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(name) :], name]))
        if name in done:
            return
        for dependency in sorted(graph[name]):
            walk(dependency, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        walk(name, [])


def _hooks(spec_class: type, required: tuple[str, ...]) -> dict[str, str]:
    hooks = {}
    for name, function in inspect.getmembers(spec_class, inspect.isfunction):
        options = getattr(function, f"{hookspecs.PROJECT}_spec", {})
        hooks[name] = (
            f"{inspect.signature(function)} firstresult={bool(options.get('firstresult'))}"
            f" required={name in required} deprecated={options.get('warn_on_impl') is not None}"
        )
    return hooks


def _signatures() -> dict[str, dict[str, str]]:
    """Every hook of every plugin kind (and of runtimes of API 1.x): its parameters and options."""
    result = {kind: _hooks(spec_class, required) for kind, (_group, spec_class, required) in hookspecs.KINDS.items()}
    result["runtime (API 1.x)"] = _hooks(*hookspecs_v1.RUNTIME_V1[:2])
    return dict(sorted(result.items()))


def _sdk() -> list[str]:
    """Every public name of the SDK, with what it is."""
    return sorted(f"{name}: {type(getattr(sdk, name)).__name__}" for name in sdk.__all__)


def test_hook_signatures_change_only_with_the_api_version() -> None:
    recorded = json.loads(SNAPSHOT.read_text())
    assert recorded["api_version"] == hookspecs.API_VERSION, (
        f"API_VERSION is {hookspecs.API_VERSION} but {SNAPSHOT.name} records {recorded['api_version']}: "
        "record the hooks of the new version"
    )
    assert recorded["hooks"] == _signatures(), (
        "a hook changed without a new API_VERSION: raise the minor for a new optional hook, the major for a "
        f"changed or removed one, and record the result in {SNAPSHOT.name}"
    )
    assert recorded["sdk"] == _sdk(), (
        "a public name of shimhub.sdk changed without a new API_VERSION: raise the minor for an added name, the "
        f"major for a removed or changed one, and record the result in {SNAPSHOT.name}"
    )


def test_a_misspelled_hook_is_a_type_error_not_a_missing_hook() -> None:
    from shimhub.plugins import LoadedPlugin

    class Runtime:
        shimhub_api = "2.0"

        @hookspecs.hookimpl
        def runtime_setup(self) -> None: ...

        @hookspecs.hookimpl
        def runtime_container_create(self) -> None: ...

        @hookspecs.hookimpl
        def runtime_container_start(self) -> None: ...

        @hookspecs.hookimpl
        def runtime_container_kill(self) -> None: ...

        @hookspecs.hookimpl
        def runtime_container_wait(self) -> None: ...

        @hookspecs.hookimpl
        def runtime_container_remove(self) -> None: ...

        @hookspecs.hookimpl
        def runtime_container_state(self) -> None: ...

    plugin = LoadedPlugin("runtime", "minimal", Runtime, "minimal")
    assert plugin.implements("runtime_container_start")
    assert not plugin.implements("runtime_exec")
    with pytest.raises(TypeError, match="have no hook 'runtime_container_strat'"):
        plugin.implements("runtime_container_strat")
    with pytest.raises(TypeError, match="have no hook 'runtime_container_stop'"):
        plugin.call("runtime_container_stop", sandbox=None, container=None, timeout=0)  # gone in API 2.0


def test_no_module_of_the_core_is_over_400_lines() -> None:
    """A room per concept: a module past 400 lines holds more than one."""
    long = {
        str(path.relative_to(ROOT)): n for path in CORE.rglob("*.py") if (n := len(path.read_text().splitlines())) > 400
    }
    assert long == {}
