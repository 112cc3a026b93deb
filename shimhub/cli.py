"""The `shimhub` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from shimhub import __version__, config, config_import, plugins
from shimhub.errors import ConfigError, PluginLoadError
from shimhub.hookspecs import API_VERSION

#: Seconds the client commands wait for the running shimhub.
CLIENT_TIMEOUT = 30.0


def _load_config(args: argparse.Namespace) -> config.Config:
    path = Path(args.config) if args.config else None
    overrides = {key: getattr(args, key, None) for key in ("socket", "state_dir", "run_dir", "log_level")}
    return config.load(path, required=path is not None, overrides={k: v for k, v in overrides.items() if v})


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the CRI socket until SIGTERM/SIGINT."""
    from shimhub.daemon import Daemon
    from shimhub.server import Server, SocketInUse, run_until_signalled
    from shimhub.state import StateDirInUse, lock_state_dir

    cfg = _load_config(args)
    try:
        lock_state_dir(cfg.state_dir)  # held until the process ends
    except StateDirInUse as exc:
        print(f"shimhub: {exc}", file=sys.stderr)
        return 1
    daemon = Daemon(cfg)
    daemon.recover()
    daemon.start_nri()
    server = Server(daemon, Path(cfg.socket))

    def reload() -> None:
        log = logging.getLogger("shimhub")
        log.info("SIGHUP: reloading the configuration")
        try:
            daemon.reload(_load_config(args))
        except (ConfigError, PluginLoadError) as exc:
            log.error("configuration not reloaded, the running one stays: %s", exc)

    try:
        run_until_signalled(server, reload)
    except SocketInUse as exc:
        print(f"shimhub: {exc}", file=sys.stderr)
        return 1
    finally:
        daemon.stop_nri()
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective (or the embedded default) configuration as TOML."""
    if args.default:
        sys.stdout.write(config.default_text())
        return 0
    sys.stdout.write(tomli_w.dumps(_without_unset(config.dump(_load_config(args)))))
    return 0


def cmd_config_import(args: argparse.Namespace) -> int:
    """Print the shimhub configuration equivalent to CRI-O's or containerd's, listing what has none."""
    data, left_out = config_import.read(args.source, args.files)
    sys.stdout.write(config_import.header(args.source, args.files, left_out) + tomli_w.dumps(data))
    return 0


def _without_unset(data: Any) -> Any:
    """`data` without its None values: TOML has no null, and an unset key reads back as unset."""
    if isinstance(data, dict):
        return {key: _without_unset(value) for key, value in data.items() if value is not None}
    if isinstance(data, list):
        return [_without_unset(value) for value in data]
    return data


def cmd_plugins(args: argparse.Namespace) -> int:
    """List the installed plugins and whether each loads; with --check, self-test one on this node."""
    if args.check:
        return _check_plugin(args)
    found = plugins.discover()
    if args.json:
        print(json.dumps([attrs.asdict(info) for info in found], indent=2))
        return 0
    print(f"plugin API {API_VERSION}")
    for info in found:
        print(f"{info.kind:<10} {info.name:<16} {info.distribution} {info.version}  [{info.status}]  {info.target}")
    if not found:
        print("no plugins installed")
    return 0 if all(info.status == "ok" for info in found) else 1


def _check_plugin(args: argparse.Namespace) -> int:
    """Set plugin (or handler) `args.check` up as shimhub would and print what is missing."""
    from shimhub import selfcheck

    logging.getLogger("shimhub").setLevel(logging.ERROR)  # the verdicts below say it once
    cfg = _load_config(args)
    uses = selfcheck.uses(cfg, args.check)
    if not uses:
        print(f"shimhub: no runtime handler and no installed plugin is named {args.check!r} (see `shimhub plugins`)")
        return 2
    verdicts = [selfcheck.check(cfg, use) for use in uses]
    for verdict in verdicts:
        print(f"{verdict.role}: {'ready' if verdict.ok else 'NOT READY'}")
        if verdict.problem:
            print(f"  missing: {verdict.problem}")
        for key, value in sorted(verdict.info.items()):
            print(f"  {key}: {value}")
    return 0 if all(verdict.ok for verdict in verdicts) else 1


def _client(args: argparse.Namespace) -> Any:
    """A RuntimeService stub on the socket of the running shimhub."""
    import grpc

    from shimhub_proto.cri.v1 import api_pb2_grpc

    socket = args.socket or _load_config(args).socket
    return api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(f"unix:{socket}"))


def _ask(call: Any, request: Any, tolerate: tuple[Any, ...] = ()) -> Any:
    """`call(request)` with a timeout; None for an error code in `tolerate`.

    Other gRPC errors become one line on stderr (raised as SystemExit).
    """
    import grpc

    try:
        return call(request, timeout=CLIENT_TIMEOUT)
    except grpc.RpcError as exc:
        if exc.code() in tolerate:
            return None
        raise SystemExit(f"shimhub: {exc.code().name}: {exc.details()}") from None


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running shimhub's conditions and the readiness of its handlers and backends."""
    from shimhub_proto.cri.v1 import api_pb2 as cri

    answer = _ask(_client(args).Status, cri.StatusRequest(verbose=True))
    conditions = {
        c.type: {"ready": c.status, "reason": c.reason, "message": c.message} for c in answer.status.conditions
    }
    print(json.dumps({"conditions": conditions, **json.loads(answer.info["status"])}, indent=2, sort_keys=True))
    return 0 if all(c["ready"] for c in conditions.values()) else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the full record of one pod sandbox or container (id or unique prefix)."""
    import grpc

    from shimhub_proto.cri.v1 import api_pb2 as cri

    client = _client(args)
    found = _ask(
        client.PodSandboxStatus,
        cri.PodSandboxStatusRequest(pod_sandbox_id=args.id, verbose=True),
        tolerate=(grpc.StatusCode.NOT_FOUND,),
    )
    kind = "pod sandbox"
    if found is None:
        found = _ask(client.ContainerStatus, cri.ContainerStatusRequest(container_id=args.id, verbose=True))
        kind = "container"
    print(json.dumps({"kind": kind, "record": json.loads(found.info["info"])}, indent=2, sort_keys=True))
    return 0


def cmd_orphans(args: argparse.Namespace) -> int:
    """List the pods rebuilt for containers whose pod record was lost; with --remove, remove them."""
    from shimhub.orphans import ORPHAN_LABEL
    from shimhub_proto.cri.v1 import api_pb2 as cri

    client = _client(args)
    selector = cri.PodSandboxFilter(label_selector={ORPHAN_LABEL: "true"})
    found = _ask(client.ListPodSandbox, cri.ListPodSandboxRequest(filter=selector)).items
    for pod in found:
        if args.remove:
            _ask(client.RemovePodSandbox, cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
        print(f"{pod.id}  {pod.metadata.name}  {'removed' if args.remove else 'left to remove'}")
    return 0


def cmd_version(_args: argparse.Namespace) -> int:
    """Print shimhub's version and its plugin API version."""
    print(f"shimhub {__version__} (CRI v1, plugin API {API_VERSION})")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `shimhub` command."""
    top = argparse.ArgumentParser(prog="shimhub", description="A CRI v1 container runtime built from plugins.")
    sub = top.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config", help=f"main config file (default {config.DEFAULT_CONFIG_PATH}, drop-ins in its .d dir)"
        )
        return p

    serve = with_config(sub.add_parser("serve", help=cmd_serve.__doc__))
    serve.add_argument("--socket", help="CRI socket path (overrides the config)")
    serve.add_argument("--state-dir", dest="state_dir", help="state directory (overrides the config)")
    serve.add_argument("--run-dir", dest="run_dir", help="runtime directory (overrides the config)")
    serve.add_argument(
        "--log-level", dest="log_level", choices=config.LOG_LEVELS, help="log level (overrides the config)"
    )
    serve.set_defaults(func=cmd_serve)

    show = with_config(sub.add_parser("config", help=cmd_config.__doc__))
    show.add_argument("--default", action="store_true", help="print the embedded default configuration")
    show.set_defaults(func=cmd_config)
    importing = show.add_subparsers(dest="config_action").add_parser("import", help=cmd_config_import.__doc__)
    importing.add_argument("--from", dest="source", choices=config_import.SOURCES, required=True)
    importing.add_argument("files", nargs="+", type=Path, help="the configuration files, later ones overriding")
    importing.set_defaults(func=cmd_config_import)

    listing = with_config(sub.add_parser("plugins", help=cmd_plugins.__doc__))
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument(
        "--check", metavar="NAME", help="set up plugin or runtime handler NAME on this node and print what is missing"
    )
    listing.set_defaults(func=cmd_plugins)

    for name, func in (("status", cmd_status), ("inspect", cmd_inspect), ("orphans", cmd_orphans)):
        client = with_config(sub.add_parser(name, help=func.__doc__))
        client.add_argument("--socket", help="CRI socket path (default: the config's)")
        if name == "inspect":
            client.add_argument("id", help="pod sandbox or container id, or a unique prefix")
        if name == "orphans":
            client.add_argument("--remove", action="store_true", help="remove them (with their containers)")
        client.set_defaults(func=func)

    sub.add_parser("version", help=cmd_version.__doc__).set_defaults(func=cmd_version)
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `shimhub` console script."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("shimhub").setLevel(logging.INFO)
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PluginLoadError) as exc:
        print(f"shimhub: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
