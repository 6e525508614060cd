"""Moved to `unisd.objective.teacher`; this name stays importable (the same module object)."""

import sys

from unisd.objective import teacher as _module

sys.modules[__name__] = _module
