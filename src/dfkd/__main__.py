"""``python -m dfkd`` (so that ``torchrun -m dfkd distill ...`` works)."""

from dfkd.commands.cli import main

raise SystemExit(main())
