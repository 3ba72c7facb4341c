"""The MLflow model registry: aliases, the champion and the pyfunc that serves a registered version.
The top library layer: it may import every other package."""
