"""Moved to :mod:`transfer.rpc.api`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.rpc import api as _moved

sys.modules[__name__] = _moved
