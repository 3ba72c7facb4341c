"""Re-exports for model versions registered with the entry point `from stages.lib.pyfunc import
ImageClassifierModel` (before the library had packages). New code imports `stages.lib.registry.pyfunc`."""

from stages.lib.registry.pyfunc import ImageClassifierModel, log_image_classifier  # noqa: F401
