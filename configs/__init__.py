"""Experiment configs: one module per experiment, each with ``get_config(variant=None)``."""
