"""The VM toolkit that shimhub's VM runtime plugins (kata, clearcontainers) share.

* `guest` builds what a VM boots: an initramfs with the guest kernel's modules
  and a read-only guest OS image holding the agent, Python and runc;
* `qemu` starts and stops one QEMU process per pod and probes the acceleration;
* `channel` is the framed message protocol between shimhub and the agent;
* `agent` runs inside the guest (standard library only) and drives runc there;
* `agentclient` is shimhub's end of the channel;
* `tap` hands the pod's CNI interface to the VM through a tap device;
* `runtime` is the runtime plugin base class; a plugin only chooses how a
  container's root filesystem reaches the guest.
"""

__version__ = "0.1.0"
