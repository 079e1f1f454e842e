"""Moved to :mod:`transfer.replicas.aio_client`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.replicas import aio_client as _moved

sys.modules[__name__] = _moved
