"""Old import paths of modules that now live in :mod:`protein_lm.data`, kept working.

YAML configs, LightningCLI ``config.yaml`` files and Lightning checkpoints name classes by module
path (``class_path: protein_lm.datamodule.ProteinDataModule``; ``_class_path`` in a checkpoint's
``datamodule_hyper_parameters``), and scripts import them. Each old path in :data:`MOVED` is a
stand-in module put into ``sys.modules`` when ``protein_lm`` is imported; it costs nothing until an
attribute is read through it. The first read imports the new modules; every attribute read is that of
the new module defining it. It is a read-only view: setting an attribute on an old path changes only
the stand-in (patch the new module instead), so ``monkeypatch`` and its undo never touch the new modules. The first use from outside
the package emits one ``DeprecationWarning`` naming the new path (the package's own modules are
exempt: ``protein_lm/model.py`` still imports ``protein_lm.tokenizer``, and a user could not act on
that; ``tests/test_imports.py`` keeps any other module from using an old path).

Being in ``sys.modules`` before anything asks for it matters: Lightning refuses to load a
checkpoint whose ``_class_path`` does not resolve through ``sys.modules`` alone (it never imports
code named by a checkpoint), so a stand-in registered on first import would not be enough.
The stand-in returns the very objects of the new modules (``protein_lm.datamodule.ProteinDataModule
is protein_lm.data.datamodule.ProteinDataModule``), so pickles, ``isinstance`` and class identity agree.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
import warnings

# old path -> the modules that now hold its public names, searched in this order
MOVED: dict[str, tuple[str, ...]] = {
    "protein_lm.datamodule": ("protein_lm.data.datamodule", "protein_lm.data.datasets", "protein_lm.data.sampler",
                              "protein_lm.data.options", "protein_lm.data.loader"),
    "protein_lm.cache": ("protein_lm.data.cache", "protein_lm.data.readers"),
    "protein_lm.fasta": ("protein_lm.data.fasta",),
    "protein_lm.tokenizer": ("protein_lm.data.tokenizer",),
    "protein_lm.splits": ("protein_lm.data.splits",),
    "protein_lm.collate": ("protein_lm.data.collate",),
    "protein_lm.packing": ("protein_lm.data.packing",),
    "protein_lm.record_checks": ("protein_lm.data.record_checks",),
}


class MovedModule(types.ModuleType):
    """Stands at an old module path; its attributes are those of the modules in ``MOVED[name]``."""

    def __init__(self, name: str) -> None:
        super().__init__(name, f"Moved to {', '.join(MOVED[name])} (deprecated path).")
        # A spec, so that importlib.util.find_spec(name) answers instead of raising on ``None``.
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)
        self.__targets__: list[types.ModuleType] | None = None
        self.__warned__ = False

    def _owner(self, attr: str) -> types.ModuleType:
        """The new module that defines ``attr`` (the first one if none does)."""
        if self.__targets__ is None:
            self.__targets__ = [importlib.import_module(m) for m in MOVED[self.__name__]]
        if not self.__warned__:
            # sys._getframe(2): the code that read the attribute (this <- the dunder method <- it).
            # The package's own modules are not warned about: their users could not act on it.
            caller = sys._getframe(2).f_globals.get("__name__", "")
            if caller != "protein_lm" and not caller.startswith("protein_lm."):
                self.__warned__ = True
                warnings.warn(
                    f"{self.__name__} is deprecated: import from {MOVED[self.__name__][0]} "
                    "(and name that module in configs' class_path)",
                    DeprecationWarning,
                    stacklevel=3,
                )
        return next((m for m in self.__targets__ if attr in vars(m)), self.__targets__[0])

    def __getattr__(self, attr: str):
        # Dunders are asked of every module in sys.modules by tools (inspect, pickle, pytest, ...);
        # answering them must not import anything.
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        owner = self._owner(attr)
        try:
            return getattr(owner, attr)
        except AttributeError:
            raise AttributeError(f"module {self.__name__!r} (moved to {MOVED[self.__name__][0]}) "
                                 f"has no attribute {attr!r}") from None

    def __dir__(self) -> list[str]:
        return sorted({a for m in MOVED[self.__name__] for a in dir(importlib.import_module(m))})


def install() -> None:
    """Register every old path (once; a module already there is left alone)."""
    package = sys.modules["protein_lm"]
    for name in MOVED:
        module = sys.modules.setdefault(name, MovedModule(name))
        if isinstance(module, MovedModule):  # `import protein_lm.cache` then reads it off the package
            setattr(package, name.rpartition(".")[2], module)
