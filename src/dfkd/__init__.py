"""dfkd: data-free knowledge distillation.

Compress a trained teacher into a smaller student without the teacher's training data: images are synthesised
from the teacher itself and the student learns to imitate the teacher on them.

Example:
    >>> import dfkd
    >>> cfg = dfkd.load_config("distill", "fashion-mnist/cudfkd-lenet5_bn-lenet5_half",
    ...                        ["teacher.weights=runs/teacher", "out=runs/student"])
    >>> summary = dfkd.distill(cfg)                      # or dfkd.distill(cfg, teacher=my_nn_module)
    >>> summary["student_top1_best"]
    >>> card = dfkd.export_student("runs/student")       # runs/student/export: student.safetensors + card.json
    >>> student = dfkd.load_student(card["path"])        # takes [0, 1] images; student.card is the card
"""

from dfkd._version import __version__
from dfkd.config import load_config
from dfkd.engine.distill import distill
from dfkd.engine.evaluate import evaluate_weights
from dfkd.engine.export import export_student
from dfkd.engine.supervised import train_teacher
from dfkd.errors import DfkdError

# Importing the methods fills dfkd.registry.METHODS, where the config finds each method's Config class.
from dfkd.methods import METHODS, Batch, Ctx, Method, MethodConfig, Progress
from dfkd.models import create_generator, create_model
from dfkd.models.exported import load_student

__all__ = [
    "METHODS",
    "Batch",
    "Ctx",
    "DfkdError",
    "Method",
    "MethodConfig",
    "Progress",
    "create_generator",
    "create_model",
    "distill",
    "evaluate_weights",
    "export_student",
    "load_config",
    "load_student",
    "train_teacher",
    "__version__",
]
