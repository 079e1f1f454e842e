"""Moved to :mod:`transfer.engines.kvio`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.engines import kvio as _moved

sys.modules[__name__] = _moved
