"""Experiments: each a typed config, a ``run`` function and a CLI subcommand."""
