"""The pipeline's stages (one module each) and their shared library (`stages.lib`).

A stage started by a Python that lacks the project's packages (the environment not activated, so
PATH found another `python`) stops here with one line that says what to do, not a traceback.
"""

import sys
from importlib.util import find_spec

_missing = [name for name in ("numpy", "pandas", "pydantic", "yaml", "mlflow") if find_spec(name) is None]
if _missing:
    sys.exit(
        f"error: {sys.executable} lacks the project's packages ({', '.join(_missing)}). Activate the project's "
        "environment first: `source .venv/bin/activate` (created by `make install`), then run the command again."
    )
