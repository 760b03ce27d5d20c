"""`python -m cli`: the same as the `inspectd` command."""

import sys

from cli.main import main

sys.exit(main())
