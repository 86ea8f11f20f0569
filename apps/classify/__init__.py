"""PPMA image classification: ``python -m apps.classify {train,eval,predict}``.

Modules: ``cli`` (arguments), ``datasets`` (Fashion-MNIST, digits, image folders with
bad-file skipping), ``transforms`` (size-aware augmentation), ``train`` (recipe on top of
:mod:`apps.engine`), ``evaluate`` (metrics, confusion matrix), ``predict`` (top-k labels),
``weights`` (loading our files and the authors' checkpoints for inference).
"""
