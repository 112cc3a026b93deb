"""What the pod and container managers need of the node: the collaborators the daemon wires together.

The managers and the stats collector are typed against this protocol, not
against the daemon that implements it, so that no core module below the
daemon has to import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shimhub.backends import Backend
    from shimhub.cdi import Registry
    from shimhub.config import Config
    from shimhub.extensions import Extensions
    from shimhub.handlers import HandlerRegistry
    from shimhub.images.manager import ImageManager
    from shimhub.locks import KeyedLocks
    from shimhub.names import NameRegistry
    from shimhub.records import ContainerRecord, SandboxRecord
    from shimhub.state import StateStore


class Node(Protocol):
    """The node's shared state and plugins, as the managers see them."""

    config: Config
    store: StateStore
    locks: KeyedLocks
    pod_names: NameRegistry
    container_names: NameRegistry
    handlers: HandlerRegistry
    network: Backend
    storage_drivers: dict[str, Backend]
    images: ImageManager
    #: What adjusts every container's spec after the core built it: the extensions, then NRI.
    extensions: Extensions
    #: The node's CDI devices.
    cdi: Registry

    def storage_for(self, handler_name: str) -> tuple[str, Backend]:
        """The storage driver (name and backend) that a handler's containers use."""

    def emit(self, event: str, sandbox: SandboxRecord, container: ContainerRecord | None = None) -> None:
        """Tell extensions and listeners about a lifecycle change."""

    def collect_garbage(self) -> None:
        """Remove image layers and blobs nothing uses any more."""

    def collect_garbage_soon(self) -> None:
        """Collect garbage on a thread of its own, without waiting."""
