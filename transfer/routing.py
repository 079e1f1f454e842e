"""Moved to :mod:`transfer.replicas.routing`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.replicas import routing as _moved

sys.modules[__name__] = _moved
