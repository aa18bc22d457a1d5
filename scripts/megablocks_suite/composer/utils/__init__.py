from . import dist, reproducibility  # noqa: F401
