"""Built-in passes; each module registers one pass by its recipe name."""
from . import annotate, calibrate, fold_batchnorm, insert_qdq  # noqa: F401  (registration side effects)
