"""Registry scope names: a camera id, a line, or the default that every camera falls back to.

Apart from the registry so that the command line names them without loading the model stack.
"""

from __future__ import annotations

DEFAULT_SCOPE = "default"
