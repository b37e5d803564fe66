"""The one list of global pre-training methods: names to classes, without importing torch.

Config validation (``PretrainConfig.method``, the experiment's initialisations), the CLI's
``--method`` choices and the experiment runner read ``method_names()``; the config's method
sections and ``--resume`` read ``options_class`` and ``options_fixed_on_resume``; the
pre-training loop builds the configured method with ``lrcseg.methods.base.build_method``,
which looks its class up here. Built-in methods are named below and imported on first use
(their options from torch-free modules), so ``config.py`` and ``lrcseg --help`` never load
torch.

A method added outside lrcseg is one class in one module; importing the module registers it,
and from then on config validation, the CLI and the experiment runner accept its name. A
package that declares the class as an entry point of the group ``lrcseg.methods``
(``[project.entry-points."lrcseg.methods"] toy = "mypkg.toy:Toy"``) makes the name known to
every process, a fresh ``lrcseg pretrain --method toy`` or ``--resume`` of such a run
included: the entry point's name is listed without importing anything, and it is loaded
(and registered) when the method is first built::

    from lrcseg.methods import register_method
    from lrcseg.methods.base import GlobalMethod

    @register_method("toy")
    class Toy(GlobalMethod):
        @classmethod
        def from_config(cls, cfg, online, context):
            return cls()

        def forward(self, out1, out2, views):
            loss = (out1["global"] - out2["global"]).pow(2).sum(dim=1).mean()
            return loss, {}

A method's options are a dataclass the class names as ``options`` (define it in a module that
does not import torch when the method is built in): the pre-training config then takes them as
a section named after the method (``toy: {weight: 2.0}``, like ``moco:``), validates them
through ``options_class`` and saves them in the run's config.yaml; ``cfg.options()`` gives the
method its section. Every option is fixed on ``--resume`` (it changes the objective) unless its
field says ``metadata=FREE_ON_RESUME``::

    @dataclass
    class ToyOptions:
        weight: float = 1.0
        log_norm: bool = field(default=False, metadata=FREE_ON_RESUME)

        def __post_init__(self):
            if self.weight <= 0:
                raise ConfigError(f"Illegal toy.weight {self.weight}: need > 0")

    @register_method("toy")
    class Toy(GlobalMethod):
        options = ToyOptions
        ...
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import TypeVar

from lrcseg.errors import ConfigError

#: the built-in methods, in the order help texts list them ("none" = LRC alone), and the
#: module that defines (and registers) each
_BUILTIN_MODULES: dict[str, str] = {
    "moco": "lrcseg.methods.moco",
    "simclr": "lrcseg.methods.simclr",
    "byol": "lrcseg.methods.byol",
    "none": "lrcseg.methods.none",
    "supervised": "lrcseg.methods.supervised",
}
#: the built-in methods' options dataclasses ("module.Class"), each in a module that does not
#: import torch, so config validation never loads a method; the method class names the same
#: class as ``options``. Methods not listed here take no options.
_BUILTIN_OPTIONS: dict[str, str] = {
    "moco": "lrcseg.methods.moco_options.MocoConfig",
    "simclr": "lrcseg.methods.simclr_options.SimCLRConfig",
    "byol": "lrcseg.methods.byol_options.BYOLConfig",
}
#: field metadata of a method option that ``--resume`` may change (one that leaves the
#: objective as it is, e.g. what is logged); every other option is fixed on resume
FREE_ON_RESUME = {"resume": "free"}
#: the entry-point group through which installed packages add methods
ENTRY_POINT_GROUP = "lrcseg.methods"
#: initialisation names that are not methods ("scratch" = no pre-training, experiment runner)
RESERVED_NAMES = ("scratch",)

_classes: dict[str, type] = {}

MethodClass = TypeVar("MethodClass", bound=type)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_method(name: str) -> Callable[[MethodClass], MethodClass]:
    """Class decorator: make ``cls`` the global method called ``name``.

    The class must have ``from_config(cfg, online, context)`` (subclass
    ``lrcseg.methods.base.GlobalMethod``) and, if it takes options, a dataclass as ``options``.
    A name is a lower-case identifier, not a reserved one (``RESERVED_NAMES``) nor a built-in
    method's, and taken by one class only (registering the same class again, as a module
    reload does, is allowed).
    """
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"Illegal method name {name!r}: need a lower-case identifier")
    if name in RESERVED_NAMES:
        raise ValueError(f"Illegal method name {name!r}: reserved ({', '.join(RESERVED_NAMES)})")

    def register(cls: MethodClass) -> MethodClass:
        if not callable(getattr(cls, "from_config", None)):
            raise TypeError(f"method {name!r}: {_qualified(cls)} has no from_config "
                            "(subclass lrcseg.methods.base.GlobalMethod)")
        options = getattr(cls, "options", None)
        if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
            raise TypeError(f"method {name!r}: {_qualified(cls)}.options must be a dataclass, "
                            f"got {options!r}")
        builtin = _BUILTIN_MODULES.get(name)
        if builtin is not None and cls.__module__ != builtin:
            raise ValueError(f"method name {name!r} is built in ({builtin})")
        known = _classes.get(name)
        if known is not None and _qualified(known) != _qualified(cls):
            raise ValueError(f"method name {name!r} is already registered ({_qualified(known)})")
        _classes[name] = cls
        return cls

    return register


def _plugins() -> dict[str, EntryPoint]:
    """Installed packages' methods by name (built-in names are never taken by a plugin)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)
            if ep.name not in _BUILTIN_MODULES and ep.name not in RESERVED_NAMES}


def method_names() -> tuple[str, ...]:
    """Every method name: the built-in ones in help order, then the registered additions, then
    installed packages' entry points not loaded yet."""
    added = [name for name in _classes if name not in _BUILTIN_MODULES]
    return (*_BUILTIN_MODULES, *added, *(n for n in sorted(_plugins()) if n not in _classes))


def method_class(name: str) -> type:
    """The class registered as ``name`` (a built-in one is imported now, an entry point loaded
    and registered); ConfigError if none."""
    if name not in _classes and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _classes and name in (plugins := _plugins()):
        loaded = plugins[name].load()  # a class, or a module that registers one
        if isinstance(loaded, type) and name not in _classes:
            register_method(name)(loaded)
    if name not in _classes:
        raise ConfigError(f"Illegal method {name!r}: one of {', '.join(method_names())}")
    return _classes[name]


def options_class(name: str) -> type | None:
    """The options dataclass of method ``name`` (its config section), None if it takes none.

    A built-in method's comes from its torch-free module (``_BUILTIN_OPTIONS``); any other is
    the registered class's ``options`` attribute (an installed package's entry point is loaded
    now). ConfigError if no method is called ``name``.
    """
    if name in _BUILTIN_MODULES:
        path = _BUILTIN_OPTIONS.get(name)
        if path is None:
            return None
        module, _, qualname = path.rpartition(".")
        return getattr(importlib.import_module(module), qualname)
    return getattr(method_class(name), "options", None)


def options_fixed_on_resume(name: str) -> dict[str, bool]:
    """Each option of method ``name`` -> True if ``--resume`` must keep its value (the
    default), False if its field is marked ``FREE_ON_RESUME``; {} for a method without options."""
    options = options_class(name)
    if options is None:
        return {}
    return {f.name: f.metadata.get("resume") != "free" for f in dataclasses.fields(options)}
