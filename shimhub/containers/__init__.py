"""Containers: CreateContainer and the calls that follow it, a room per call (as containerd's CRI server).

* `creation`: CreateContainer, from validation to the runtime's create hook;
* `lifecycle`: start, stop (the escalation to SIGKILL), removal, updates, log reopening;
* `exec`: ExecSync, Exec and Attach;
* `checkpoint`: CheckpointContainer;
* `base`: finding records and keeping their live state current.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from shimhub.background import Coalesced
from shimhub.containers.checkpoint import Checkpointing
from shimhub.containers.creation import Creation
from shimhub.containers.exec import Exec
from shimhub.containers.lifecycle import Lifecycle

if TYPE_CHECKING:
    from shimhub.node import Node

__all__ = ["ContainerManager"]


class ContainerManager(Creation, Lifecycle, Exec, Checkpointing):
    """Creates, starts, stops and removes containers, and keeps their state current."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._state_guard = threading.Lock()
        #: Finishes removals after RemoveContainer has answered (see `remove`).
        self.removals = Coalesced(self.finish_removals, "container removal")
