"""Moved to `unisd.objective.reliability`; this name stays importable (the same module object)."""

import sys

from unisd.objective import reliability as _module

sys.modules[__name__] = _module
