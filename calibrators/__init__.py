"""Built-in calibrators; each module registers one calibrator by its recipe name."""
from . import aciq  # noqa: F401  (registers "aciq")
from . import ema_max  # noqa: F401  (registers "ema_max")
from . import entropy  # noqa: F401  (registers "entropy")
from . import minmax  # noqa: F401  (registers "max")
from . import mse  # noqa: F401  (registers "mse")
from . import percentile  # noqa: F401  (registers "percentile")
