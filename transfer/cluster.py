"""Moved to :mod:`transfer.replicas.client`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.replicas import client as _moved

sys.modules[__name__] = _moved
