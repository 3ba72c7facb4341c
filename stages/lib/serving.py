"""Re-exports for model versions registered before the library had packages: their MLflow entry point
runs `from stages.lib.serving import ImageClassifierModel`, and in a process that has imported this
project's `stages` (as `stages.predict --model models:/...` has) that import finds this module.
New code imports from `stages.lib.inference` and `stages.lib.registry`."""

from stages.lib.inference.classifier import ImageClassifier, ImageDecodeError, decode_image  # noqa: F401
from stages.lib.registry.pyfunc import ImageClassifierModel  # noqa: F401
