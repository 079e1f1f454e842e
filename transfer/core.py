"""Moved to :mod:`transfer.rpc.core`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.rpc import core as _moved

sys.modules[__name__] = _moved
