"""Built-in calibrators; each module registers one calibrator by its recipe name."""
from . import minmax  # noqa: F401  (registers "max")
