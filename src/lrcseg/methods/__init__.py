"""Global pre-training methods (stateful: queues, momentum and target encoders, heads).

One module per method (moco, simclr, byol, none, supervised), the interface in ``base``
(``GlobalMethod``, ``Views``, ``build_method``) and the one list of names in ``registry``.
This package imports no torch: ``config.py`` and ``lrcseg --help`` use the registry.
"""

from lrcseg.methods.registry import method_class, method_names, register_method

__all__ = ["method_class", "method_names", "register_method"]
