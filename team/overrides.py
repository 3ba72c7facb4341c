"""What a sweep varies: `-S` overrides in DVC's (Hydra's) grammar, expanded into trials.

- Grid: `-S 'finetune.phases.1.lr=3e-4,1e-3' -S 'base.seed=42,1,2'` is the product, 6 trials, in the
  order Hydra's multirun gives (the last key varies fastest). A comma inside brackets, braces,
  parentheses or quotes does not split (`-S 'augment.scale=[0.9,1.1]'` is one value). Each trial passes
  one `key=value` per key to `dvc exp run -S`, so DVC parses and checks the values.
- Search (`--search optuna`): a value may be a distribution
      loguniform(low,high)  uniform(low,high)  int(low,high)  choice(a,b,...)
  a comma list is a choice, a single value is fixed.
- Objective: `metrics/<file>.json:<dotted.key>`; only validation metrics may be optimised (a test metric
  chosen on would leak the test split into model selection).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from team import TeamError

DISTRIBUTION = re.compile(r"^(loguniform|uniform|int|choice)\((.*)\)$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,60}$")


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """`text` split at `separator`s outside brackets, braces, parentheses and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    if quote or depth or any(not part for part in parts):
        raise TeamError(f"cannot read the override value {text!r}: unbalanced brackets or quotes, or an empty item")
    return parts


def parse_override(text: str) -> tuple[str, str]:
    """`key=value` -> (key, value); the key dotted as in `dvc exp run -S`."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not value.strip() or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
        raise TeamError(f"-S {text!r}: write key=value (e.g. -S 'finetune.phases.1.lr=3e-4,1e-3')")
    if key.startswith(("+", "~")):
        raise TeamError(f"-S {text!r}: adding or deleting keys is not supported in a sweep")
    return key, value.strip()


def grid(overrides: list[str]) -> list[dict[str, str]]:
    """The trials of a grid: one {key: value} per combination (Hydra's order: the last key fastest)."""
    keys, choices = [], []
    for text in overrides:
        key, value = parse_override(text)
        if DISTRIBUTION.match(value) and not value.startswith("choice("):
            raise TeamError(f"-S {text!r}: a distribution needs --search optuna (a grid takes comma lists)")
        if key in keys:
            raise TeamError(f"-S {key} is given twice")
        keys.append(key)
        match = DISTRIBUTION.match(value)
        choices.append(split_top_level(match.group(2)) if match else split_top_level(value))
    return [dict(zip(keys, combination)) for combination in itertools.product(*choices)] if keys else [{}]


@dataclass(frozen=True)
class Dimension:
    """One key of a search space: `kind` is fixed | choice | uniform | loguniform | int."""

    key: str
    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    def suggest(self, trial) -> str:
        """This dimension's value for an Optuna trial, as the text `dvc exp run -S` receives."""
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return str(trial.suggest_int(self.key, int(self.low), int(self.high)))
        value = trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")
        return f"{value:.6g}"


def search_space(overrides: list[str]) -> list[Dimension]:
    """The dimensions of an Optuna search from `-S` overrides."""
    dimensions = []
    for text in overrides:
        key, value = parse_override(text)
        match = DISTRIBUTION.match(value)
        if match and match.group(1) == "choice":
            dimensions.append(Dimension(key, "choice", tuple(split_top_level(match.group(2)))))
        elif match:
            bounds = split_top_level(match.group(2))
            try:
                low, high = (float(bound) for bound in bounds)
            except ValueError:
                raise TeamError(f"-S {text!r}: {match.group(1)}(low,high) takes two numbers") from None
            if not low < high or (match.group(1) == "loguniform" and low <= 0):
                raise TeamError(
                    f"-S {text!r}: needs low < high{' and low > 0' if match.group(1) == 'loguniform' else ''}"
                )
            dimensions.append(Dimension(key, match.group(1), low=low, high=high))
        else:
            values = split_top_level(value)
            dimensions.append(Dimension(key, "choice" if len(values) > 1 else "fixed", tuple(values)))
    return dimensions


@dataclass(frozen=True)
class Objective:
    """A metric of a metrics file (`metrics/evaluate.json:finetuned.val.accuracy`), maximised or minimised."""

    path: str
    key: str
    mode: str = "max"

    @classmethod
    def parse(cls, text: str, mode: str = "max") -> "Objective":
        path, sep, key = text.partition(":")
        if not sep or not path.endswith((".json", ".yaml", ".yml")) or not key:
            raise TeamError(f"--objective {text!r}: write FILE:KEY, e.g. metrics/evaluate.json:finetuned.val.accuracy")
        if "test" in re.split(r"[._\-]", key.lower()):
            raise TeamError(
                f"--objective {text!r} is a test metric: choose on a val metric "
                "(e.g. metrics/evaluate.json:finetuned.val.accuracy); the test split stays for the report"
            )
        if mode not in ("max", "min"):
            raise TeamError(f"--mode {mode!r}: max or min")
        return cls(path, key, mode)

    def __str__(self) -> str:
        return f"{self.path}:{self.key}"

    def read(self, root: Path) -> float | None:
        """The metric's value in the working copy at `root`, None when absent."""
        try:
            text = (root / self.path).read_text()
        except OSError:
            return None
        return self.value(text)

    def value(self, text: str) -> float | None:
        import yaml

        data = json.loads(text) if self.path.endswith(".json") else yaml.safe_load(text)
        for part in self.key.split("."):
            if not isinstance(data, dict) or part not in data:
                return None
            data = data[part]
        return float(data) if isinstance(data, (int, float)) and not isinstance(data, bool) else None

    def better(self, a: float | None, b: float | None) -> bool:
        """Whether `a` beats `b` (None never wins)."""
        if a is None:
            return False
        return b is None or (a > b if self.mode == "max" else a < b)


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise TeamError(f"--name {name!r}: letters, digits, '-' and '_' only (it names DVC experiments and git refs)")
    return name


def trial_name(sweep: str, index: int, total: int) -> str:
    """`<sweep>-<index>`, zero-padded to the sweep's size so names sort in trial order."""
    return f"{sweep}-{index:0{max(2, len(str(total)))}d}"
