"""Handing a pod's CNI interface to its VM: a tap device in the pod's network namespace, joined with tc.

The network backend set up an interface (eth0) with the pod's addresses in
the pod's network namespace. A tap device is added beside it and tc
"mirred" filters redirect every frame arriving on either to the other, so the
VM's NIC (the tap's other end, given eth0's MAC address) is on the pod
network as eth0 was. The guest then takes eth0's addresses and routes, which
`describe` reads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any

from shimhub.sdk import FailedPrecondition, PluginFailed, netns

TAP = "tap0_shimhub"


def _name(netns_path: str) -> str:
    path = Path(netns_path)
    if path.parent != netns.NETNS_DIR:
        raise FailedPrecondition(f"the pod's network namespace {netns_path} is not one shimhub can enter by name")
    return path.name


def describe(netns_path: str) -> dict[str, Any] | None:
    """The pod interface's MAC, MTU and addresses, and the namespace's routes, for the guest to copy;
    None when the namespace has no interface with an address (the VM then gets no network card)."""
    name = _name(netns_path)
    links = json.loads(netns.ip("-n", name, "-j", "addr", "show") or "[]")
    interface = next(
        (
            link
            for link in links
            if link["ifname"] not in ("lo", TAP) and any(a.get("scope") == "global" for a in link.get("addr_info", []))
        ),
        None,
    )
    if interface is None:
        return None
    addresses = [f"{a['local']}/{a['prefixlen']}" for a in interface["addr_info"] if a.get("scope") == "global"]
    routes = []
    for family in ("-4", "-6"):
        for route in json.loads(netns.ip("-n", name, family, "-j", "route", "show") or "[]"):
            if route.get("gateway"):
                dst = route["dst"] if route["dst"] != "default" else ("0.0.0.0/0" if family == "-4" else "::/0")
                routes.append({"dst": dst, "via": route["gateway"]})
    return {
        "interface": interface["ifname"],
        "mac": interface["address"],
        "mtu": interface.get("mtu", 1500),
        "addresses": addresses,
        "routes": routes,
        "networks": sorted({str(ipaddress.ip_interface(a).network) for a in addresses}),
    }


def attach(netns_path: str, interface: str, mtu: int) -> str:
    """Add the tap device and redirect traffic between it and `interface`; the tap's name."""
    name = _name(netns_path)
    netns.ip("-n", name, "tuntap", "add", "dev", TAP, "mode", "tap")
    try:
        netns.ip("-n", name, "link", "set", "dev", TAP, "mtu", str(mtu), "up")
        for source, target in ((interface, TAP), (TAP, interface)):
            _tc(name, "qdisc", "add", "dev", source, "ingress")
            _tc(name, "filter", "add", "dev", source, "parent", "ffff:", "protocol", "all", "u32", "match", "u8", "0",
                "0", "action", "mirred", "egress", "redirect", "dev", target)  # fmt: skip
    except PluginFailed:
        detach(netns_path, interface)
        raise
    return TAP


def detach(netns_path: str, interface: str) -> None:
    """Remove the tap device and the redirection. Idempotent."""
    if not Path(netns_path).exists():
        return
    name = _name(netns_path)
    with contextlib.suppress(PluginFailed):  # not there (any more)
        _tc(name, "qdisc", "del", "dev", interface, "ingress")
    with contextlib.suppress(PluginFailed):
        netns.ip("-n", name, "link", "del", TAP)


def _tc(netns: str, *args: str) -> None:
    try:
        done = subprocess.run(["tc", "-n", netns, *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PluginFailed(f"tc {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise PluginFailed(f"tc {' '.join(args)} failed: {done.stderr.strip()}")
