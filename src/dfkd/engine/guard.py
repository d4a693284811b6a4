"""The collapse guard: method-agnostic signs that a distillation run has stopped producing a student.

A data-free run can fail without a NaN: the student blows up once, a curriculum or a clipped loss then hands it no
gradient, and every later epoch reports chance accuracy with a loss of exactly zero. The guard looks at what every
method has, after each epoch's evaluation:

- ``agreement at chance``: the student agrees with the teacher no more often than two independent predictors with
  the same class frequencies would (Cohen's kappa below ``KAPPA_MIN``), while the teacher itself is informative;
  kappa measures agreement against the product of the two class distributions, so it holds for any number of
  classes and any class balance (two classes, a set where the teacher puts most images in one class);
- ``zero student loss``: the student's loss averaged over the whole epoch is (effectively) 0: no gradient reached it;
- ``one class``: the student puts at least ``ONE_CLASS_SHARE`` of the evaluation images in one class while the
  teacher does not.

The two accuracy signals wait until the student has taken ``MIN_STEPS`` steps: a freshly initialised network predicts
one class at chance, and a few-step smoke run has not failed, it has barely started. A zero loss is a failure at any
step.

The teacher is informative when its own predictions carry something to agree with: it puts less than
``ONE_CLASS_SHARE`` of the images in one class (the bar of the one-class signal; above it nearly every answer
agrees by chance and kappa says nothing), and on labelled images it agrees with the labels beyond chance (its own
kappa against them at least ``TEACHER_KAPPA_MIN``; about 1.5 x chance top-1 on ten balanced classes). Each flagged
epoch logs a warning at once. The run's ``status`` is ``collapsed`` when its last epoch is flagged
(or the guard stopped it), ``diverged`` when a loss became NaN/Inf, else ``ok``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dfkd.errors import STATUS_COLLAPSED, STATUS_OK
from dfkd.metrics import top1_percent

KAPPA_MIN = 0.02
ONE_CLASS_SHARE = 0.9
ZERO_LOSS = 1e-6  # a loss this small over a whole epoch moves no weight: the student is frozen
TEACHER_KAPPA_MIN = 0.05
MIN_STEPS = 100


def class_shares(logits: Tensor, num_classes: int) -> Tensor:
    """The fraction of inputs predicted as each class (float64, sums to 1)."""
    return label_shares(logits.argmax(dim=1), num_classes)


def label_shares(labels: Tensor, num_classes: int) -> Tensor:
    """The fraction of ``labels`` (class indices) in each class (float64, sums to 1)."""
    counts = torch.bincount(labels.flatten(), minlength=num_classes).double()
    return counts / counts.sum().clamp_min(1.0)


def _chance_percent(student_shares: Tensor, teacher_shares: Tensor) -> float:
    return float((student_shares * teacher_shares).sum() * 100.0)


def chance_agreement_percent(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Agreement (in %) expected of two independent predictors with these class frequencies: 100 * sum_c p_s p_t."""
    k = max(student_logits.shape[1], teacher_logits.shape[1])
    return _chance_percent(class_shares(student_logits, k), class_shares(teacher_logits, k))


def agreement_kappa(agreement: float, chance: float) -> float:
    """Cohen's kappa from percentages: 0 = chance, 1 = perfect agreement."""
    return 1.0 if chance >= 100.0 else (agreement - chance) / (100.0 - chance)


def teacher_is_informative(teacher_logits: Tensor, labels: Tensor | None) -> bool:
    """Whether the teacher's answers on the evaluation images leave something to agree with beyond chance: fewer
    than ``ONE_CLASS_SHARE`` of them in one class and, with ``labels``, a kappa against the labels of at least
    ``TEACHER_KAPPA_MIN``."""
    k = teacher_logits.shape[1]
    teacher_shares = class_shares(teacher_logits, k)
    if float(teacher_shares.max()) >= ONE_CLASS_SHARE:
        return False
    if labels is None:
        return True
    chance = _chance_percent(teacher_shares, label_shares(labels, k))
    return agreement_kappa(top1_percent(teacher_logits, labels), chance) >= TEACHER_KAPPA_MIN


def collapse_reasons(
    agreement: float,
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    student_loss: float | None,
    student_steps: int = MIN_STEPS,
) -> list[str]:
    """The collapse signals that hold for one evaluated epoch (empty when the student looks alive).

    Args:
        agreement: student-teacher agreement on the evaluation images, in %.
        student_logits, teacher_logits: their logits on those images.
        labels: the images' labels (None when there are none, e.g. held-out synthetic images).
        student_loss: the mean student loss over the epoch (None when the method logged none).
        student_steps: student steps taken so far; below ``MIN_STEPS`` only the zero-loss signal applies.
    """
    reasons = []
    judged = student_steps >= MIN_STEPS
    k = teacher_logits.shape[1]
    teacher_shares = class_shares(teacher_logits, k)
    student_shares = class_shares(student_logits, k)
    chance = _chance_percent(student_shares, teacher_shares)
    kappa = agreement_kappa(agreement, chance)
    if judged and kappa < KAPPA_MIN and teacher_is_informative(teacher_logits, labels):
        reasons.append(
            f"agreement with the teacher no better than chance ({agreement:.2f}% vs {chance:.2f}% by chance)"
        )
    if student_loss is not None and abs(student_loss) < ZERO_LOSS:
        reasons.append(f"student loss {student_loss:.3g} for the whole epoch (no gradient reaches the student)")
    top_share = float(student_shares.max())
    if judged and top_share >= ONE_CLASS_SHARE and float(teacher_shares.max()) < ONE_CLASS_SHARE:
        reasons.append(f"the student predicts one class for {top_share * 100:.1f}% of the images")
    return reasons


@dataclass
class CollapseGuard:
    """Tracks flagged epochs; ``patience`` consecutive ones make :attr:`should_stop` true (when stopping is on)."""

    stop: bool = False
    patience: int = 2
    flagged: list[dict] = field(default_factory=list)
    streak: int = 0
    stopped_early: bool = False

    def update(self, epoch: int, reasons: list[str]) -> None:
        if reasons:
            self.flagged.append({"epoch": epoch, "reasons": reasons})
            self.streak += 1
        else:
            self.streak = 0

    @property
    def should_stop(self) -> bool:
        return self.stop and self.streak >= max(1, self.patience)

    def status(self, last_epoch: int) -> tuple[str, str | None]:
        """``(status, reason)`` of a run whose last evaluated epoch is ``last_epoch``."""
        last = self.flagged[-1] if self.flagged else None
        if last is not None and last["epoch"] == last_epoch:
            where = f"stopped early at epoch {last_epoch}" if self.stopped_early else f"at epoch {last_epoch}"
            return STATUS_COLLAPSED, f"{'; '.join(last['reasons'])} ({where})"
        return STATUS_OK, None

    def state_dict(self) -> dict:
        return {"flagged": list(self.flagged), "streak": self.streak, "stopped_early": self.stopped_early}

    def load_state_dict(self, state: dict) -> None:
        self.flagged = list(state.get("flagged", []))
        self.streak = int(state.get("streak", 0))
        self.stopped_early = bool(state.get("stopped_early", False))
