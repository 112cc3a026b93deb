"""`python -m shimhub`: the same as the `shimhub` command."""

import sys

from shimhub.cli import main

sys.exit(main())
