"""Moved to `unisd.objective.diff`; this name stays importable (the same module object)."""

import sys

from unisd.objective import diff as _module

sys.modules[__name__] = _module
