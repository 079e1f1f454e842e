"""Moved to :mod:`transfer.replicas.repair`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.replicas import repair as _moved

sys.modules[__name__] = _moved
