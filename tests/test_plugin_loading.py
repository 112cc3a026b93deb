"""Plugins that are broken stop the daemon with a message naming them; missing ones only disable a handler."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
import stevedore

from shimhub import plugins
from shimhub.hookspecs import API_VERSION
from shimhub.testing.daemon import host_network, pod_config
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT

pytestmark = NEEDS_ROOT

GOOD_HOOKS = """
from shimhub.hookspecs import hookimpl
from shimhub.hooktypes import ContainerState, ContainerStatus, Readiness

class Base:
    shimhub_api = "1.0"
    @hookimpl
    def runtime_setup(self, options, context): return Readiness(ready=True)
    @hookimpl
    def runtime_sandbox_run(self, sandbox, config, network): pass
    @hookimpl
    def runtime_sandbox_stop(self, sandbox): pass
    @hookimpl
    def runtime_sandbox_remove(self, sandbox): pass
    @hookimpl
    def runtime_container_create(self, sandbox, container, config, rootfs): pass
    @hookimpl
    def runtime_container_start(self, sandbox, container): pass
    @hookimpl
    def runtime_container_stop(self, sandbox, container, timeout): pass
    @hookimpl
    def runtime_container_remove(self, sandbox, container): pass
    @hookimpl
    def runtime_container_state(self, sandbox, container): return ContainerState(status=ContainerStatus.CREATED)
"""

BROKEN = {
    "import-error": (
        "import nonexistent_module_xyz\n",
        "cannot be imported: ModuleNotFoundError: No module named 'nonexistent_module_xyz'",
    ),
    "no-api": (
        GOOD_HOOKS + "class Plugin(Base):\n    shimhub_api = None\n",
        f'declares no shimhub_api = "MAJOR.MINOR" (this shimhub provides {API_VERSION})',
    ),
    "future-api": (
        GOOD_HOOKS + "class Plugin(Base):\n    shimhub_api = '2.1'\n",
        f"written for plugin API 2.1, this shimhub provides {API_VERSION}",
    ),
    "old-major": (
        GOOD_HOOKS + "class Plugin(Base):\n    shimhub_api = '0.9'\n",
        f"written for plugin API 0.9, this shimhub provides {API_VERSION}",
    ),
    "wrong-args": (
        GOOD_HOOKS + "class Plugin(Base):\n    @hookimpl\n    def runtime_sandbox_stop(self, sandbox, force): pass\n",
        "hook 'runtime_sandbox_stop'",
    ),
    "unknown-hook": (
        GOOD_HOOKS + "class Plugin(Base):\n    @hookimpl\n    def runtime_sandbox_explode(self, sandbox): pass\n",
        "unknown hook 'runtime_sandbox_explode'",
    ),
    "missing-hook": (
        GOOD_HOOKS + "class Plugin(Base):\n    runtime_container_state = None\n",
        "does not implement required hook(s) runtime_container_state",
    ),
    "no-stop": (
        GOOD_HOOKS + "class Plugin(Base):\n    runtime_container_stop = None\n",
        "does not implement required hook(s) runtime_container_kill and runtime_container_wait "
        "(or the deprecated runtime_container_stop)",
    ),
    "failing-init": (
        GOOD_HOOKS + "class Plugin(Base):\n    def __init__(self):\n        raise OSError('no /dev/kvm')\n",
        "cannot be instantiated: OSError: no /dev/kvm",
    ),
}


def install_fake_distribution(site: Path, dist: str, module: str, source: str, entry_points: str) -> None:
    """Lay out a module and its .dist-info where importlib.metadata finds it (as pip would)."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_plugin_stops_startup_naming_it(daemon_factory, tmp_path: Path, case: str) -> None:
    source, expected = BROKEN[case]
    site = tmp_path / "site"
    module = f"broken_{case.replace('-', '_')}"
    install_fake_distribution(site, f"shimhub-{case}", module, source, f"[shimhub.runtime]\nbroken = {module}:Plugin\n")
    daemon = daemon_factory(
        '[runtimes.x]\nplugin = "broken"\n[network]\nbackend = "host"\n', env={"PYTHONPATH": str(site)}
    )
    served = daemon.command("serve", "--config", str(daemon.config_path))
    assert served.returncode == 2
    label = f"runtime plugin 'broken' (shimhub.runtime = {module}:Plugin, distribution shimhub-{case} 0.1)"
    assert label in served.stderr
    assert expected in served.stderr
    assert "Traceback" not in served.stderr
    assert not daemon.socket.exists()
    listing = daemon.command("plugins")
    assert listing.returncode == 1
    assert f"error: {label}" in listing.stdout


def test_a_runtime_of_api_1_with_the_deprecated_stop_hook_loads_with_warnings(daemon_factory, tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_fake_distribution(
        site,
        "shimhub-oldstop",
        "oldstop",
        GOOD_HOOKS + "class Plugin(Base): pass\n",
        "[shimhub.runtime]\nold = oldstop:Plugin\n",
    )
    config = 'default_runtime = "old"\n[runtimes.old]\nplugin = "old"\n[network]\nbackend = "host"\n'
    daemon = daemon_factory(config, env={"PYTHONPATH": str(site)}).start()
    conditions = {c.type: c for c in daemon.runtime.Status(cri.StatusRequest()).status.conditions}
    assert conditions["RuntimeReady"].status
    label = "runtime plugin 'old' (shimhub.runtime = oldstop:Plugin, distribution shimhub-oldstop 0.1)"
    assert f"{label}: runtime_container_stop is deprecated since plugin API 1.4 and is not in 2.0" in daemon.log()
    assert f"{label}: plugin API 1.x is deprecated and goes in 3.0" in daemon.log()


def test_two_distributions_claiming_one_name(daemon_factory, tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_fake_distribution(
        site,
        "shimhub-impostor",
        "impostor",
        GOOD_HOOKS + "class Plugin(Base): pass\n",
        "[shimhub.runtime]\nproc = impostor:Plugin\n",
    )
    daemon = daemon_factory(
        'default_runtime = "proc"\n[runtimes.proc]\nplugin = "proc"\n', env={"PYTHONPATH": str(site)}
    )
    served = daemon.command("serve", "--config", str(daemon.config_path))
    assert served.returncode == 2
    assert "2 distributions provide runtime plugin 'proc'" in served.stderr
    assert "distribution shimhub-impostor 0.1" in served.stderr
    assert "distribution shimhub-procrun 1.2.0" in served.stderr


def test_invalid_plugin_options_stop_startup(daemon_factory) -> None:
    daemon = daemon_factory('[runtimes.p]\nplugin = "proc"\n[runtimes.p.options]\ncolour = "red"\n')
    served = daemon.command("serve", "--config", str(daemon.config_path))
    assert served.returncode == 2
    assert "[runtimes.p.options]: unknown option(s) colour; known: chroot, nsenter" in served.stderr


def test_missing_plugin_and_missing_binary_only_disable_their_handlers(daemon_factory) -> None:
    daemon = daemon_factory(
        """
        default_runtime = "ok"
        [runtimes.ok]
        plugin = "proc"
        [runtimes.ghost]
        plugin = "ghost"
        [runtimes.nobinary]
        plugin = "proc"
        [runtimes.nobinary.options]
        nsenter = "/nonexistent/nsenter"
        [network]
        backend = "host"
        """.replace("        ", "")
    ).start()
    rt = daemon.runtime
    status = rt.Status(cri.StatusRequest(verbose=True))
    conditions = {c.type: c for c in status.status.conditions}
    assert conditions["RuntimeReady"].status
    assert conditions["NetworkReady"].status
    handlers_ready = conditions["RuntimeHandlersReady"]
    assert not handlers_ready.status
    assert handlers_ready.reason == "HandlersDisabled"
    assert (
        "ghost: no runtime plugin named 'ghost' is installed (entry point group shimhub.runtime)"
        in handlers_ready.message
    )
    assert "nobinary: /nonexistent/nsenter not found" in handlers_ready.message
    names = {h.name for h in status.runtime_handlers}
    assert {"", "ok"} <= names
    assert not names & {"ghost", "nobinary"}

    config = pod_config(linux=host_network())
    with pytest.raises(grpc.RpcError) as refused:
        rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config, runtime_handler="nobinary"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == "runtime handler 'nobinary' is not ready: /nonexistent/nsenter not found"
    pod_id = rt.RunPodSandbox(cri.RunPodSandboxRequest(config=config, runtime_handler="ok")).pod_sandbox_id
    assert rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.state == cri.SANDBOX_READY
    assert "runtime handler 'ghost' is disabled" in daemon.log()


def test_default_handler_missing_makes_runtime_not_ready(daemon_factory) -> None:
    config = 'default_runtime = "vm"\n[runtimes.vm]\nplugin = "ghost"\n[network]\nbackend = "host"\n'
    rt = daemon_factory(config).start().runtime
    conditions = {c.type: c for c in rt.Status(cri.StatusRequest()).status.conditions}
    assert not conditions["RuntimeReady"].status
    assert conditions["RuntimeReady"].reason == "DefaultHandlerNotReady"
    assert "runtime handler 'vm': no runtime plugin named 'ghost' is installed" in conditions["RuntimeReady"].message


@pytest.mark.unit
@pytest.mark.parametrize("stale", ["an old module", "no such entry point"])
def test_a_stale_entry_point_cache_is_rebuilt_with_a_warning(
    stale: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reinstall that stevedore's cache did not notice: the class comes from the installed distribution."""
    from stevedore import _cache

    monkeypatch.setattr(_cache._c, "_dir", str(tmp_path))
    monkeypatch.setattr(_cache._c, "_internal", {})
    monkeypatch.setattr(stevedore.ExtensionManager, "ENTRY_POINT_CACHE", {})
    digest, _paths = _cache._hash_settings_for_path(tuple(sys.path))
    cached = _cache._build_cacheable_data()
    runtimes = [entry for entry in cached["groups"]["shimhub.runtime"] if entry[0] != "runc"]
    if stale == "an old module":
        runtimes.append(["runc", "shimhub_runc_before_reinstall.runtime:RuncRuntime", "shimhub.runtime"])
    cached["groups"]["shimhub.runtime"] = runtimes
    (tmp_path / digest).write_text(json.dumps(cached))

    with caplog.at_level(logging.WARNING, logger="shimhub"):
        plugin_class, _label = plugins.load_class("runtime", "runc")

    assert f"{plugin_class.__module__}:{plugin_class.__name__}" == "shimhub_runc.runtime:RuncRuntime"
    assert "stale entry-point cache" in caplog.text
    rebuilt = json.loads((tmp_path / digest).read_text())["groups"]["shimhub.runtime"]
    assert ["runc", "shimhub_runc.runtime:RuncRuntime", "shimhub.runtime"] in rebuilt
