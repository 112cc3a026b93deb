"""Registry settings from the node's registries.conf(5) and containerd hosts directory."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from shimhub.config_schema import ImagesConfig, RegistryConfig
from shimhub.images import node_registries
from shimhub_proto.cri.v1 import api_pb2 as cri
from tests.conftest import NEEDS_ROOT
from tests.test_images import image_config, pull

#: An upstream that never answers (the discard port): a pull succeeds only through its mirror.
DEAD = "127.0.0.1:9"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def images(tmp_path: Path, **fields: object) -> ImagesConfig:
    defaults = {"registries_conf": str(tmp_path / "registries.conf"), "hosts_dir": str(tmp_path / "certs.d")}
    return ImagesConfig(**{**defaults, **fields})  # type: ignore[arg-type]


@pytest.mark.unit
def test_registries_conf_mirrors_blocks_and_search_with_their_sources(tmp_path: Path) -> None:
    main = write(
        tmp_path / "registries.conf",
        """
        unqualified-search-registries = ["first.example", "second.example"]
        [[registry]]
        location = "first.example"
        [[registry.mirror]]
        location = "mirror.example:5000"
        insecure = true
        [[registry]]
        prefix = "old.example"
        location = "new.example"
        [[registry]]
        location = "bad.example"
        blocked = true
        [[registry]]
        prefix = "first.example/team"
        location = "team.example"
        """,
    )
    dropin = write(tmp_path / "registries.conf.d" / "50-override.conf", '[[registry]]\nlocation = "bad.example"\n')
    merged, found = node_registries.merged(images(tmp_path), search_is_shimhubs=False)
    registries = merged.registries
    assert registries["first.example"] == RegistryConfig(mirrors=["mirror.example:5000"])
    assert registries["mirror.example:5000"] == RegistryConfig(insecure=True)
    assert registries["old.example"] == RegistryConfig(mirrors=["new.example"], mirror_only=True)
    assert registries["bad.example"] == RegistryConfig(), "the drop-in's entry replaces the main file's"
    assert merged.search_registries == ["first.example", "second.example"]
    assert found.sources["first.example"] == str(main)
    assert found.sources["bad.example"] == str(dropin)
    assert found.left_out == [
        f"{main}: [[registry]] 'first.example/team': only a whole registry host is configured per entry"
    ]
    summary = found.summary()
    assert summary["search_registries"] == {"value": ["first.example", "second.example"], "source": str(main)}
    assert summary["registries"]["mirror.example:5000"]["source"] == str(main)


@pytest.mark.unit
def test_a_blocked_registry_and_shimhubs_own_tables_win(tmp_path: Path) -> None:
    write(
        tmp_path / "registries.conf",
        """
        unqualified-search-registries = ["elsewhere.example"]
        [[registry]]
        location = "blocked.example"
        blocked = true
        [[registry]]
        location = "mine.example"
        insecure = true
        """,
    )
    own = {"mine.example": RegistryConfig(mirrors=["m.example"])}
    merged, found = node_registries.merged(
        images(tmp_path, registries=own, search_registries=["mine.example"]), search_is_shimhubs=True
    )
    assert merged.registries["blocked.example"].blocked
    assert merged.registries["mine.example"] == own["mine.example"]
    assert (merged.search_registries, found.sources["mine.example"]) == (["mine.example"], "shimhub")


@pytest.mark.unit
def test_hosts_toml_mirrors_tls_and_what_is_left_out(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    hosts = write(
        certs / "upstream.example" / "hosts.toml",
        """
        server = "https://upstream.example"
        [host."http://127.0.0.1:5000"]
        capabilities = ["pull", "resolve"]
        [host."https://tls-mirror.example"]
        capabilities = ["pull", "resolve"]
        ca = "/etc/ssl/mirror-ca.pem"
        [host."https://blobs-only.example"]
        capabilities = ["pull"]
        [host."https://skip.example"]
        skip_verify = true
        """,
    )
    write(certs / "_default" / "hosts.toml", '[host."https://any.example"]\n')
    remapped = write(certs / "legacy.example" / "hosts.toml", 'server = "http://127.0.0.1:6000"\n')
    merged, found = node_registries.merged(images(tmp_path), search_is_shimhubs=False)
    registries = merged.registries
    assert registries["upstream.example"].mirrors == ["127.0.0.1:5000", "tls-mirror.example", "skip.example"]
    assert not registries["upstream.example"].mirror_only
    assert registries["127.0.0.1:5000"] == RegistryConfig(insecure=True)
    assert registries["tls-mirror.example"] == RegistryConfig(ca_file="/etc/ssl/mirror-ca.pem")
    assert registries["skip.example"] == RegistryConfig(skip_verify=True)
    assert registries["legacy.example"] == RegistryConfig(mirrors=["127.0.0.1:6000"], mirror_only=True)
    assert registries["127.0.0.1:6000"].insecure
    assert found.sources["legacy.example"] == str(remapped)
    assert sorted(found.left_out) == sorted(
        [
            f"{certs / '_default' / 'hosts.toml'}: _default (settings for every host) is not read",
            f"{hosts}: host 'https://blobs-only.example': a mirror that does not resolve tags",
        ]
    )
    assert merged.search_registries == ["docker.io"]


@pytest.mark.unit
def test_a_broken_node_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "registries.conf", "[[registry]\n")
    with pytest.raises(node_registries.ConfigError, match=r"registries.conf: not valid TOML"):
        node_registries.merged(images(tmp_path), search_is_shimhubs=False)


def _node_config(registry, tmp_path: Path) -> str:
    """The test daemon's config without any registry table of its own: the node's files say it all."""
    base = image_config(registry).split("[images]")[0]
    return f'{base}[images]\nregistries_conf = "{tmp_path / "registries.conf"}"\nhosts_dir = "{tmp_path / "certs.d"}"\n'


@NEEDS_ROOT
def test_a_node_with_only_a_registries_conf_mirror_pulls_through_it(daemon_factory, registry, tmp_path: Path) -> None:
    write(
        tmp_path / "registries.conf",
        f"""
        [[registry]]
        location = "{DEAD}"
        [[registry.mirror]]
        location = "{registry.open.host}"
        insecure = true
        """,
    )
    daemon = daemon_factory(_node_config(registry, tmp_path)).start()
    assert pull(daemon, f"{DEAD}/test/busybox:1") == registry.busybox["config"]
    info = json.loads(daemon.runtime.Status(cri.StatusRequest(verbose=True)).info["status"])
    reported = info["image_registries"]["registries"][registry.open.host]
    assert (reported["source"], reported["insecure"]) == (str(tmp_path / "registries.conf"), True)


@NEEDS_ROOT
def test_a_node_with_only_a_hosts_toml_mirror_pulls_through_it(daemon_factory, registry, tmp_path: Path) -> None:
    write(
        tmp_path / "certs.d" / DEAD / "hosts.toml",
        f'server = "http://{DEAD}"\n[host."http://{registry.open.host}"]\ncapabilities = ["pull", "resolve"]\n',
    )
    daemon = daemon_factory(_node_config(registry, tmp_path)).start()
    assert pull(daemon, f"{DEAD}/test/busybox:1") == registry.busybox["config"]


@NEEDS_ROOT
def test_a_blocked_registry_is_refused_by_name(daemon_factory, registry, tmp_path: Path) -> None:
    import grpc

    write(tmp_path / "registries.conf", f'[[registry]]\nlocation = "{registry.open.host}"\nblocked = true\n')
    daemon = daemon_factory(_node_config(registry, tmp_path)).start()
    with pytest.raises(grpc.RpcError) as caught:
        pull(daemon, f"{registry.open.host}/test/busybox:1")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "blocked by the node's registry settings" in caught.value.details()
