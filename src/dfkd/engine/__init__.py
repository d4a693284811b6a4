"""The machinery every method shares: device, precision, DDP, optimisation, evaluation, checkpoints, logging.

Nothing in this package knows a method by name.
"""
