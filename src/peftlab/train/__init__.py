"""Training and evaluation: ``peftlab.train.run(config_or_yaml, overrides=[...], resume=False)``."""

from .config import ConfigError, RunConfig, load_config  # noqa: F401
from .loop import TrainingDivergedError, evaluate, run  # noqa: F401
