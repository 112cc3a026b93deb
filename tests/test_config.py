"""Configuration loading: defaults, drop-ins, and an exact message for every kind of mistake."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from shimhub import cli, config
from shimhub.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(main: Path, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        config.load(main, **kwargs)
    return str(caught.value)


def test_embedded_default_works_with_no_file(tmp_path: Path) -> None:
    loaded = config.load(tmp_path / "absent.toml")
    assert loaded.default_runtime == "runc"
    assert loaded.runtimes["runc"].plugin == "runc"
    assert loaded.socket == "/run/shimhub/shimhub.sock"
    assert loaded.storage.driver == "overlay"
    assert loaded.network.backend == "cni"


def test_explicit_file_must_exist(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.toml", required=True) == f"{tmp_path / 'nope.toml'}: no such configuration file"


def test_dropins_merge_in_name_order_and_options_replace_whole(tmp_path: Path) -> None:
    main = write(tmp_path / "shimhub.toml", '[runtimes.runc.options]\nbinary = "/a/runc"\nroot = "/x"\n')
    write(tmp_path / "shimhub.d/20-late.toml", 'log_level = "error"\n')
    write(tmp_path / "shimhub.d/10-early.toml", 'log_level = "debug"\n[runtimes.runc.options]\nbinary = "/b/runc"\n')
    write(tmp_path / "shimhub.d/30-ignored.conf", 'log_level = "warning"\n')
    loaded = config.load(main)
    assert loaded.log_level == "error"
    assert loaded.runtimes["runc"].options == {"binary": "/b/runc"}


def test_command_line_overrides_apply_last(tmp_path: Path) -> None:
    main = write(tmp_path / "shimhub.toml", 'socket = "/from/file.sock"\n')
    assert config.load(main, overrides={"socket": "/cli.sock"}).socket == "/cli.sock"
    message = error_of(main, overrides={"state_dir": "relative"})
    assert "command line: state_dir: expected an absolute path, got 'relative'" in message


@pytest.mark.parametrize(
    ("main_text", "dropin_text", "expected"),
    [
        ("log_level = 3\n", "", "{main}: log_level: expected a string, got int 3"),
        ('log_level = "loud"\n', "", "{main}: log_level: expected one of debug, info, warning, error, got 'loud'"),
        ('cgroup_driver = "both"\n', "", "{main}: cgroup_driver: expected one of cgroupfs, systemd, got 'both'"),
        ("colour = 1\n", "", "{main}: colour: unknown key"),
        ("[runtimes.kata]\nselectable = true\n", "", "{main}: runtimes.kata.plugin: required key is missing"),
        (
            '[runtimes.runc]\nselectable = "yes"\n',
            "",
            "{main}: runtimes.runc.selectable: expected true or false, got str 'yes'",
        ),
        (
            '[runtimes.runc]\nallowed_annotations = "io."\n',
            "",
            "{main}: runtimes.runc.allowed_annotations: expected a list of strings, got 'io.'",
        ),
        ("", '[storage]\nroot = "var/lib"\n', "{dropin}: storage.root: expected an absolute path, got 'var/lib'"),
        ("", 'default_runtime = "kata"\n', "{dropin}: default_runtime: no [runtimes.kata] table (handlers: runc)"),
        ('untrusted_runtime = "vm"\n', "", "{main}: untrusted_runtime: no [runtimes.vm] table (handlers: runc)"),
        ('[runtimes."Bad Name"]\nplugin = "runc"\n', "", "{main}: runtimes.Bad Name: a handler name must be"),
        ('[runtimes.x]\nplugin = ""\n', "", "{main}: runtimes.x.plugin: names no runtime plugin"),
        ("shutdown_grace = -1\n", "", "{main}: shutdown_grace: expected a number of seconds >= 0, got -1.0"),
        ("[network\n", "", "{main}: not valid TOML: "),
    ],
)
def test_each_mistake_names_file_key_and_expectation(
    tmp_path: Path, main_text: str, dropin_text: str, expected: str
) -> None:
    main = write(tmp_path / "shimhub.toml", main_text)
    dropin = tmp_path / "shimhub.d" / "50-site.toml"
    if dropin_text:
        write(dropin, dropin_text)
    message = error_of(main)
    assert expected.format(main=main, dropin=dropin) in message


def test_all_mistakes_are_reported_at_once(tmp_path: Path) -> None:
    main = write(tmp_path / "shimhub.toml", 'log_level = 1\ncolour = "red"\n[network]\nbackend = 2\n')
    message = error_of(main)
    assert message.splitlines() == [
        "invalid configuration:",
        f"  {main}: log_level: expected a string, got int 1",
        f"  {main}: network.backend: expected a string, got int 2",
        f"  {main}: colour: unknown key",
    ]


def test_dump_round_trips(tmp_path: Path) -> None:
    loaded = config.load(tmp_path / "absent.toml")
    assert config.converter.structure(config.dump(loaded), config.Config) == loaded


def _documented_examples() -> list[tuple[str, str]]:
    """Every TOML example of the README and the plugin guide, as (where, text)."""
    examples = []
    for name in ("README.md", "docs/plugins.md"):
        text = (Path(__file__).parent.parent / name).read_text()
        for number, match in enumerate(re.finditer(r"```toml\n(.*?)```", text, re.S), 1):
            examples.append((f"{name} example {number}", textwrap.dedent(match.group(1))))
    return examples


@pytest.mark.unit
@pytest.mark.parametrize(("where", "text"), _documented_examples(), ids=lambda value: value if " " in value else "")
def test_shimhub_config_prints_every_documented_example_back(
    where: str, text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path / "source.toml", text)
    assert cli.main(["config", "--config", str(source)]) == 0, where
    printed = write(tmp_path / "printed.toml", capsys.readouterr().out)
    assert config.dump(config.load(printed, required=True)) == config.dump(config.load(source, required=True)), where
