"""TensorBoard events of a run (``log.tensorboard: true``): the metrics rows, the timing split, the sample grids.

Every numeric value of an epoch's row of metrics (the line metrics.jsonl gets) becomes a scalar at step = epoch, the
student step among them as the scalar ``step``; each cumulative ``time/X`` also becomes its epoch's share,
``epoch_time/X``. All tags share the epoch as their step because a resumed run purges the events of the epochs it
repeats by step number (``purge_step``), across all tags: a second step scale would be purged wrongly.
"""

from __future__ import annotations

import logging
import math
from numbers import Real
from pathlib import Path

from torch import Tensor

from dfkd.errors import ConfigError
from dfkd.images import make_grid

log = logging.getLogger("dfkd")


def summary_writer_class() -> type:
    """torch's ``SummaryWriter``, or a one-line error naming the extra that brings tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "log.tensorboard=true needs the tensorboard package: pip install 'dfkd[tensorboard]' (or set "
            "log.tensorboard=false)"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """Writes a run's rows of metrics and sample grids under ``RUN/tensorboard``; does nothing when not enabled.

    Construct it before the run writes anything (a missing tensorboard fails there, on every rank), :meth:`open` it
    once the run knows its history (empty, or the restored one when resuming), and close it at the end (or use it
    as a context manager). Only the process that writes the run directory (rank 0) writes events.

    Example:
        >>> tb = TensorBoardLog(enabled=True)
        >>> tb.open(Path("runs/x/tensorboard"), history=[])
        >>> tb.log_row({"epoch": 1, "eval/top1": 61.5, "time/synth_seconds": 3.2})
        >>> tb.close()
    """

    def __init__(self, enabled: bool, is_main: bool = True):
        self._writer_class = summary_writer_class() if enabled else None
        self._write = enabled and is_main
        self._writer = None
        self._previous: dict = {}

    def open(self, path: Path, history: list[dict]) -> None:
        """Start writing into ``path``; with a restored ``history``, events of the epochs after it are dropped."""
        if not self._write:
            return
        resumed_after = history[-1]["epoch"] if history else 0
        self._previous = history[-1] if history else {}
        # step >= purge_step is discarded from the earlier files: what an interrupted process logged after its last
        # checkpoint (this epoch will be trained again)
        self._writer = self._writer_class(log_dir=str(path), purge_step=resumed_after + 1 if history else None)
        log.info("TensorBoard events in %s (tensorboard --logdir %s)", path, path)

    def log_row(self, row: dict) -> None:
        """Every numeric value of an epoch's row of metrics, at step = ``row["epoch"]``."""
        if self._writer is None:
            return
        epoch = int(row["epoch"])
        for key, value in row.items():
            number = _number(value)
            if key == "epoch" or number is None:
                continue
            self._writer.add_scalar(key, number, epoch)
            if key.startswith("time/"):
                before = _number(self._previous.get(key)) or 0.0
                self._writer.add_scalar("epoch_time/" + key.removeprefix("time/"), number - before, epoch)
        self._previous = row
        self._writer.flush()  # a run may be killed at any moment; a resume purges what it repeats

    def log_images(self, tag: str, images: Tensor, epoch: int) -> None:
        """A batch ``[B, C, H, W]`` of images in [0, 1] as one grid image at step ``epoch``."""
        if self._writer is not None:
            self._writer.add_image(tag, make_grid(images), epoch)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _number(value: object) -> float | None:
    """``value`` as a finite float when it is a real number (not a bool) or a one-element tensor, else None."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
