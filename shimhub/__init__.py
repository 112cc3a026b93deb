"""shimhub: a CRI v1 container runtime whose runtimes, storage and networking are plugins."""

import sys

__version__ = "0.1.0"
#: The oldest Python shimhub runs on (tomllib; layers are read by shimhub's own tar reader, not tarfile).
MINIMUM_PYTHON = (3, 11)

if sys.version_info < MINIMUM_PYTHON:
    raise SystemExit(
        f"shimhub needs Python {'.'.join(map(str, MINIMUM_PYTHON))} or later; {sys.executable} is "
        f"{sys.version.split()[0]}"
    )
