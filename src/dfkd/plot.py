"""Deprecated alias of :mod:`dfkd.commands.plot`, where ``dfkd plot`` and :func:`plot_run` moved; it goes in a later
release."""

import sys
import warnings

from dfkd.commands import plot

warnings.warn("dfkd.plot is deprecated: import dfkd.commands.plot", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = plot  # the old name is the new module: patching either patches both
