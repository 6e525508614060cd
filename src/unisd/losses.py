"""Moved to `unisd.objective.losses`; this name stays importable (the same module object)."""

import sys

from unisd.objective import losses as _module

sys.modules[__name__] = _module
