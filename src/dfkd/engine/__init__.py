"""The machinery every method shares: device, precision, DDP, optimisation, evaluation, checkpoints, logging, and
the export of a run's student.

Nothing in this package knows a method by name.
"""
