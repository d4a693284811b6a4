"""``python -m dfkd`` (so that ``torchrun -m dfkd distill ...`` works)."""

from dfkd.cli import main

raise SystemExit(main())
