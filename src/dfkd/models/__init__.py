"""Model zoo, generators and weight loading.

Classifiers are built by name with :func:`create_model`; the names and parameter names follow the CMI benchmark
zoo (``resnet34``, ``wrn40_2``, ``vgg11``, ``lenet5``, ...) so that its published teacher checkpoints load with
``strict=True``. Every builder registered in :data:`MODELS` has the signature
``fn(num_classes: int, in_channels: int) -> nn.Module``, and every ``forward`` is a plain ``forward(x)``: features
are captured with forward hooks (see :func:`classifier_module` and :func:`bn_layers`).
"""

from dfkd.models import lenet, resnet, tiny, vgg, wrn  # noqa: F401  (each registers its models)
from dfkd.models.generators import GENERATORS, create_generator, init_dcgan_
from dfkd.models.loading import bn_layers, build_network, classifier_module, resolve_weights
from dfkd.models.registry import MODELS, create_model, describe_model, model_names
from dfkd.models.weights import load_weights, read_weights
from dfkd.models.wrapper import Normalized

__all__ = [
    "GENERATORS",
    "MODELS",
    "Normalized",
    "bn_layers",
    "build_network",
    "classifier_module",
    "create_generator",
    "create_model",
    "describe_model",
    "init_dcgan_",
    "load_weights",
    "model_names",
    "read_weights",
    "resolve_weights",
]
