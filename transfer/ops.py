"""Moved to :mod:`transfer.rpc.ops`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.rpc import ops as _moved

sys.modules[__name__] = _moved
