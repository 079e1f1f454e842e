"""Moved to :mod:`transfer.replicas.ops`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.replicas import ops as _moved

sys.modules[__name__] = _moved
