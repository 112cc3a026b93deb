"""The core's translation of the CRI into OCI runtime specs, and a pod's shared pieces on the node.

* `spec` builds a container's OCI spec from its CRI config, image config and pod;
* `seccomp` is the runtime's default profile and the CRI's seccomp choices;
* `devices` the device nodes of a spec, as the handler's device policy says;
* `container` builds the specs the core hands a runtime (a container's, a pod's
  sandbox process's), and what else derives from a container's config (stop
  signal, termination log);
* `pod` sets up what a pod's containers share on the node (pinned namespaces,
  /etc files, /dev/shm, an infra process when the PID namespace is shared).
"""

from shimhub.oci import container, devices, pod, seccomp, spec

__all__ = ["container", "devices", "pod", "seccomp", "spec"]
