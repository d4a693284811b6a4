"""The command line and the reports: ``dfkd distill``, ``train-teacher``, ``eval``, ``export``, ``plot``, ``bench``,
``demo``, ``data``, ``list`` (:mod:`dfkd.commands.cli`), the benchmark suites and tables behind ``dfkd bench``, and
the plots. They sit on top: they use the engine and the building blocks below it, and nothing below imports them.
"""
