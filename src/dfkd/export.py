"""Deprecated alias: writing an export moved to :mod:`dfkd.engine.export`, reading one back to
:mod:`dfkd.models.exported`; ``dfkd.export_student`` and ``dfkd.load_student`` stay where they are. It goes in a
later release."""

import warnings

from dfkd.engine.export import FORMATS, export_student
from dfkd.models.exported import CARD_FORMAT, find_card, load_student, read_card, sha256_file

warnings.warn(
    "dfkd.export is deprecated: import export_student from dfkd.engine.export, load_student (find_card, read_card, "
    "sha256_file) from dfkd.models.exported, or use dfkd.export_student and dfkd.load_student",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["CARD_FORMAT", "FORMATS", "export_student", "find_card", "load_student", "read_card", "sha256_file"]
