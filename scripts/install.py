"""Install the project into this Python's environment with uv, a fast pip, honouring pip's settings.

`make install` runs it with the virtual environment's Python:

    .venv/bin/python -m scripts.install ".[test,export,remote,server]"

uv unpacks and links wheels in parallel: the whole set (torch included) installs in about half of pip's time,
bytecode compiled as pip does (`--compile-bytecode`: without it every process would compile on import).
uv does not read pip's configuration, so the index, extra indexes, find-links folders, constraint files
and certificate bundle that pip is configured with (`pip config list`: files and PIP_* variables) are
handed to it, and it picks the best version across all indexes as pip does
(`--index-strategy unsafe-best-match`). When uv cannot be installed or fails, pip does the install.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

OPTIONS = {  # pip's setting -> uv's option (each may hold several whitespace-separated values)
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_settings(listing: str) -> dict[str, str]:
    """pip's effective settings from `pip config list` lines (`global.find-links='/opt/wheels'`,
    `:env:.find-links='...'`): the name after the last dot -> value; PIP_* variables win over files,
    as in pip."""
    files, env = {}, {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        name = key.rsplit(".", 1)[-1]
        (env if key.startswith(":env:") else files)[name] = value.strip().strip("'\"")
    return files | env


def uv_arguments(settings: dict[str, str]) -> list[str]:
    """uv's options for pip's settings: the indexes and links pip uses, resolved as pip resolves."""
    arguments = ["--index-strategy", "unsafe-best-match"]
    for name, option in OPTIONS.items():
        for value in settings.get(name, "").split():
            arguments += [option, value]
    return arguments


def run(command: list[str], env: dict | None = None) -> int:
    print("+", shlex.join(command), flush=True)
    return subprocess.call(command, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requirements", nargs="+", help="what to install, e.g. '.[test]' (installed editable)")
    args = parser.parse_args(argv)
    pip = [sys.executable, "-m", "pip"]
    editable = [part for requirement in args.requirements for part in ("-e", requirement)]
    if run(pip + ["install", "-q", "uv"]) == 0:
        listing = subprocess.run(pip + ["config", "list"], capture_output=True, text=True).stdout
        settings = pip_settings(listing)
        env = dict(os.environ)
        if settings.get("cert"):
            env.setdefault("SSL_CERT_FILE", settings["cert"])
        uv = [sys.executable, "-m", "uv", "pip", "install", "-q", "--compile-bytecode", "--python", sys.executable]
        if run(uv + uv_arguments(settings) + editable, env=env) == 0:
            return 0
        print("uv failed: installing with pip instead", file=sys.stderr)
    return run(pip + ["install", "-q"] + editable)


if __name__ == "__main__":
    sys.exit(main())
