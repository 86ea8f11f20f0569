"""Command-line programs built on ppma_models: ``python -m apps.classify``, ``python -m apps.segment``."""
