"""Command-line programs built on ppma_models.

Run them as ``python -m apps.classify`` and ``python -m apps.segment``.
"""
