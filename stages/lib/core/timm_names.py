"""Names timm accepts, known without importing timm (and with it torch, seconds) in a process that only
validates params: asked once per installed timm version in a subprocess, and kept in a small cache file."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

_LIST_OPTIMIZERS = "import json; from timm.optim import list_optimizers; print(json.dumps(sorted(list_optimizers())))"


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transfer-pipeline"


@functools.lru_cache(maxsize=1)
def timm_optimizer_names() -> tuple[str, ...]:
    """The names timm's create_optimizer_v2 accepts (`timm.optim.list_optimizers()`), without importing
    timm (and with it torch, seconds) in this process: computed once per installed timm version in a
    subprocess and kept in `~/.cache/transfer-pipeline/timm-<version>-optimizers.json` ($XDG_CACHE_HOME)."""
    if "timm" in sys.modules:  # already paid for: ask it directly
        from timm.optim import list_optimizers

        return tuple(sorted(list_optimizers()))
    try:
        timm_version = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("timm is not installed: cannot check optimizer names") from None
    cached = _cache_dir() / f"timm-{timm_version}-optimizers.json"
    try:
        return tuple(json.loads(cached.read_text()))
    except (OSError, ValueError):
        pass
    result = subprocess.run([sys.executable, "-c", _LIST_OPTIMIZERS], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"cannot list timm's optimizers: {result.stderr.strip().splitlines()[-1:]}")
    names = json.loads(result.stdout.strip().splitlines()[-1])
    try:  # written whole, then renamed: parallel stages never read half a file
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(names) + "\n")
        os.replace(partial, cached)
    except OSError:
        pass  # a read-only home: check again next time
    return tuple(names)
