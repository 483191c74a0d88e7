"""robustlab: adversarial training and robustness evaluation for image classifiers and detectors."""
from robustlab import attacks, data, detection, models  # noqa: F401  (registers attacks, models, datasets)
from robustlab.engine.evaluator import evaluate
from robustlab.version import __version__

__all__ = ["evaluate", "attacks", "models", "data", "__version__"]
