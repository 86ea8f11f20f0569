"""Python-side registration of the native ops: fake (meta) kernels and autograd formulas.

One module per op family; each calls ``torch.library.register_fake`` and
``torch.library.register_autograd`` for the ``torch.ops.ppma.*`` ops its C++ file defines.
Imported by :mod:`ppma_ops._native` only after the compiled library has loaded.
"""

from . import (
    criss_cross_attention,  # noqa: F401
    depthwise_conv2d,  # noqa: F401
    polyline_attention,  # noqa: F401
    polyline_scan,  # noqa: F401
)
