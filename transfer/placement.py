"""Moved to :mod:`transfer.replicas.placement`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.replicas import placement as _moved

sys.modules[__name__] = _moved
