"""The built-in datasets, one module each; importing this package registers them.

Every module of this package is imported, in the order of the module names, which is the order the error messages
list the datasets in. A new built-in dataset is one more module here that calls
:func:`~lightning_hypergrad.data.registry.register`, and nothing else (see :mod:`lightning_hypergrad.data.registry`).
"""

import importlib
import pkgutil

__all__ = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))

for _name in __all__:
    importlib.import_module(f"{__name__}.{_name}")
