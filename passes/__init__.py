"""Built-in passes: every module in this package registers one pass by its recipe name.

Modules are imported automatically, so adding a pass is adding one module.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
