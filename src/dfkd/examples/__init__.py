"""Small importable examples for the README (e.g. ``teacher.arch=py:dfkd.examples.teachers:lenet5_bn_fashion``)."""
