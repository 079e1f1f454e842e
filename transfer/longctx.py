"""Moved to :mod:`transfer.engines.longctx`; this module name keeps old imports working (the same module object)."""

import sys

from transfer.engines import longctx as _moved

sys.modules[__name__] = _moved
