"""The procrun runtime passes shimhub's runtime conformance suite.

Run with: pytest -p shimhub.testing tests/
"""

from shimhub.testing import RuntimeConformance


class TestProcRuntime(RuntimeConformance):
    plugin = "proc"
