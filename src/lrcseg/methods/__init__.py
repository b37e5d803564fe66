"""Global pre-training methods (stateful: queues, momentum and target encoders, heads).

One module per method (moco, simclr, byol, none, supervised), each method's options in a
torch-free ``<name>_options`` module beside it, the interface in ``base`` (``GlobalMethod``,
``Views``, ``build_method``) and the one list of names in ``registry``. This package imports
no torch: ``config.py`` and ``lrcseg --help`` use the registry.
"""

from lrcseg.methods.registry import (
    FREE_ON_RESUME,
    method_class,
    method_names,
    options_class,
    register_method,
)

__all__ = ["FREE_ON_RESUME", "method_class", "method_names", "options_class", "register_method"]
