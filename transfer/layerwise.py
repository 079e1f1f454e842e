"""Moved to :mod:`transfer.engines.layerwise`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.engines import layerwise as _moved

sys.modules[__name__] = _moved
