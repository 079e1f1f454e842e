"""Moved to :mod:`transfer.engines.cpu_plan`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.engines import cpu_plan as _moved

sys.modules[__name__] = _moved
