"""Moved to :mod:`transfer.rpc.client`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.rpc import client as _moved

sys.modules[__name__] = _moved
