"""Datasets shared by the apps (no torch needed to read them).

- :mod:`apps.data.fashion_mnist` -- ``load_fashion_mnist(split, root)`` and class names.
"""

from apps.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNISTError, load_fashion_mnist

__all__ = ["FASHION_MNIST_CLASSES", "FashionMNISTError", "load_fashion_mnist"]
