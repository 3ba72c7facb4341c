"""The pipeline's shared library: packages by concern with one import direction,
stages -> registry -> inference / evaluation / training -> model -> data -> core
(`make lint` checks it with import-linter). `serving.py` and `pyfunc.py` only re-export, for model
versions registered with those import paths."""
