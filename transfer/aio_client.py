"""Moved to :mod:`transfer.rpc.aio_client`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.rpc import aio_client as _moved

sys.modules[__name__] = _moved
