"""Moved to :mod:`transfer.replicas.membership`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.replicas import membership as _moved

sys.modules[__name__] = _moved
