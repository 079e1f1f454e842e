"""Moved to :mod:`transfer.replicas.stats`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.replicas import stats as _moved

sys.modules[__name__] = _moved
