"""Networks: backbones and their weight sources, fusion heads, and the model card (the typed config of a
saved model) with the one `build_model()`. Imports data and core."""
