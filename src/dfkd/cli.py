"""Deprecated alias of :mod:`dfkd.commands.cli`, where the command line moved (kept for ``dfkd.cli:main``, the entry
point of installs made before the move); it goes in a later release."""

import sys
import warnings

from dfkd.commands import cli

warnings.warn("dfkd.cli is deprecated: import dfkd.commands.cli", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = cli  # the old name is the new module: patching either patches both
