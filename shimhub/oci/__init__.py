"""The core's translation of the CRI into OCI runtime specs, and a pod's shared pieces on the node.

* `spec` builds a container's OCI spec from its CRI config, image config and pod;
* `seccomp` is the runtime's default profile and the CRI's seccomp choices;
* `container` is what every OCI runtime derives alike from a container's config
  (spec with the extensions' adjustments, stop signal, termination log);
* `pod` sets up what a pod's containers share on the node (pinned namespaces,
  /etc files, /dev/shm, an infra process when the PID namespace is shared).
"""

from shimhub.oci import container, pod, seccomp, spec

__all__ = ["container", "pod", "seccomp", "spec"]
