"""Stage functions: one module per stage or task family, each stage a ``*_stage`` function
that reads the study config and writes its files (the ``medvit`` command's stage commands call
them; ``medvit.cli.STAGES`` maps each command to its function)."""
