"""Sweep specifications: a base config plus grid, random and seed axes, expanded into trials.

A sweep file (YAML)::

    name: digits-lr-layer-decay          # default: the file name without suffix
    base_config: configs/demo.yaml       # one path or a list (relative to the working directory)
    fixed: ["--trainer.max_epochs=5"]    # arguments given to every trial
    grid:                                # Cartesian product
      model.init_args.lr: [1.0e-3, 2.0e-3]
      model.init_args.layer_decay: [0.65, 0.75]
    random:                              # n_trials seeded draws, crossed with the grid
      n_trials: 4
      seed: 0
      params:
        model.init_args.drop_path_rate: uniform(0.0, 0.3)
        model.init_args.weight_decay: loguniform(1.0e-3, 1.0e-1)
        data.batch_size: choice([32, 64])
    seeds: [0, 1]                        # sets seed_everything; crossed with everything else
    metric: top1                         # validation metric that ranks trials
    mode: max
    test: true                           # test after fit and record the test split
    heatmap: [model.init_args.lr, model.init_args.layer_decay]
    launcher: {name: local, max_parallel: 2, devices_per_trial: 1}
    slurm: {partition: gpu, time_min: 720, nodes: 1, gpus_per_node: 8, cpus_per_task: 10,
            sbatch: {account: myaccount}, setup: ["source venv/bin/activate"], array: true}

Each trial is the set of ``key -> value`` overrides of one grid point, one random draw and one seed.
Its id is derived from those overrides only, so the same trial gets the same id in every invocation.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SEED_KEY = "seed_everything"
DISTRIBUTIONS = ("uniform", "loguniform", "choice")
_DIST_PATTERN = re.compile(r"^\s*(?P<name>[a-z_]+)\s*\((?P<args>.*)\)\s*$", re.DOTALL)
_SPEC_FIELDS = {
    "name", "base_config", "fixed", "grid", "random", "seeds", "metric", "mode", "test", "heatmap",
    "launcher", "slurm",
}


class SweepSpecError(ValueError):
    """An invalid sweep specification; the message names the value and the fix."""


@dataclass(frozen=True)
class Distribution:
    """A random-search distribution: ``uniform(low, high)``, ``loguniform(low, high)`` or ``choice(values)``."""

    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    @classmethod
    def parse(cls, key: str, text: Any) -> Distribution:
        """Parse ``"loguniform(1e-4, 1e-2)"`` (or a mapping ``{kind: ..., low: ..., high: ...}``) for ``key``."""
        if isinstance(text, dict):
            kind = text.get("kind")
            args = [text["low"], text["high"]] if "low" in text or "high" in text else [text.get("choices")]
        else:
            match = _DIST_PATTERN.match(str(text))
            if match is None:
                raise SweepSpecError(
                    f"random value {text!r} for {key} is not a distribution; "
                    "write uniform(low, high), loguniform(low, high) or choice([a, b, ...])"
                )
            kind = match["name"].replace("_", "")
            try:
                args = list(ast.literal_eval(f"({match['args']},)"))
            except (ValueError, SyntaxError) as error:
                raise SweepSpecError(f"arguments of {text!r} for {key} are not Python literals: {error}") from None
        if kind not in DISTRIBUTIONS:
            raise SweepSpecError(f"distribution {kind!r} for {key} is unknown; valid: {', '.join(DISTRIBUTIONS)}")

        if kind == "choice":
            values = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            if not values:
                raise SweepSpecError(f"choice for {key} is empty; give at least one value, e.g. choice([32, 64])")
            return cls(kind, choices=tuple(values))

        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise SweepSpecError(f"{kind} for {key} needs two numbers (low, high), got {args!r}")
        low, high = float(args[0]), float(args[1])
        if not low < high:
            raise SweepSpecError(f"{kind} for {key} has low {low} not below high {high}; swap or widen the range")
        if kind == "loguniform" and low <= 0:
            raise SweepSpecError(
                f"loguniform for {key} has non-positive bound {low}; log-uniform ranges need 0 < low < high"
            )
        return cls(kind, low=low, high=high)

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return rng.choice(self.choices)
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))


@dataclass(frozen=True)
class Trial:
    """One run of the sweep: its id and the config overrides (LightningCLI key -> value) that define it."""

    trial_id: str
    overrides: dict[str, Any]

    def arguments(self) -> list[str]:
        """Command-line arguments that apply the overrides, e.g. ``--model.init_args.lr=0.001``."""
        return [f"--{key}={format_value(value)}" for key, value in self.overrides.items()]


@dataclass
class SweepSpec:
    """A parsed sweep: base configs, fixed arguments, axes and what to rank by. See the module docstring."""

    name: str
    base_config: list[str]
    fixed: list[str] = field(default_factory=list)
    grid: dict[str, list] = field(default_factory=dict)
    random: dict[str, Distribution] = field(default_factory=dict)
    n_trials: int = 1
    random_seed: int = 0
    seeds: list[int] = field(default_factory=list)
    metric: str = "top1"
    mode: str = "max"
    test: bool = True
    heatmap: list[str] = field(default_factory=list)
    launcher: dict = field(default_factory=dict)
    slurm: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base_config:
            raise SweepSpecError("the sweep has no base_config; set base_config: PATH (any d2v-eval fit config)")
        for key, values in self.grid.items():
            if not isinstance(values, (list, tuple)):
                raise SweepSpecError(f"grid values for {key} must be a list, got {values!r}; write {key}: [a, b]")
            if len(values) == 0:
                raise SweepSpecError(f"grid for {key} is empty ([]); give at least one value")
        if self.random and self.n_trials < 1:
            raise SweepSpecError(f"random n_trials {self.n_trials} must be at least 1")
        if self.mode not in ("max", "min"):
            raise SweepSpecError(f"mode {self.mode!r} is invalid; use max (accuracy) or min (loss)")
        overlap = set(self.grid) & set(self.random)
        if overlap:
            raise SweepSpecError(f"keys {sorted(overlap)} are both in grid and random; keep each key on one axis")
        if self.seeds and SEED_KEY in set(self.grid) | set(self.random):
            raise SweepSpecError(f"{SEED_KEY} is swept twice: through seeds and through grid/random; keep one")
        if self.heatmap and len(self.heatmap) != 2:
            raise SweepSpecError(f"heatmap needs exactly two swept keys, got {self.heatmap!r}")

    @property
    def swept_keys(self) -> list[str]:
        """Every key that varies across trials, in axis order (grid, random, seed)."""
        return [*self.grid, *self.random, *([SEED_KEY] if self.seeds else [])]

    def heatmap_keys(self) -> list[str] | None:
        """The two keys of the summary heatmap: ``heatmap`` if set, else the first two grid keys."""
        if self.heatmap:
            return list(self.heatmap)
        return list(self.grid)[:2] if len(self.grid) >= 2 else None

    def trials(self) -> list[Trial]:
        """Expand the axes: grid points x random draws x seeds, in a deterministic order."""
        grid_points = [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]
        draws: list[dict] = [{}]
        if self.random:
            rng = random.Random(self.random_seed)
            draws = [{key: dist.sample(rng) for key, dist in self.random.items()} for _ in range(self.n_trials)]
        seeds = [{SEED_KEY: seed} for seed in self.seeds] or [{}]
        trials = []
        for point, draw, seed in itertools.product(grid_points, draws, seeds):
            overrides = {**point, **draw, **seed}
            trials.append(Trial(trial_id(overrides), overrides))
        return trials

    def to_dict(self) -> dict:
        return {
            "name": self.name, "base_config": self.base_config, "fixed": self.fixed, "grid": self.grid,
            "random": {key: _dist_text(dist) for key, dist in self.random.items()},
            "n_trials": self.n_trials, "random_seed": self.random_seed, "seeds": self.seeds,
            "metric": self.metric, "mode": self.mode, "test": self.test, "heatmap": self.heatmap,
            "launcher": self.launcher, "slurm": self.slurm,
        }


def _dist_text(dist: Distribution) -> str:
    if dist.kind == "choice":
        return f"choice({list(dist.choices)!r})"
    return f"{dist.kind}({dist.low!r}, {dist.high!r})"


def format_value(value: Any) -> str:
    """Format an override value for the command line (jsonargparse reads it as YAML).

    Floats keep full precision and always have a mantissa with a dot (``1.0e-05``), because YAML 1.1
    readers take ``1e-05`` for a string.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, (int, str)) or value is None:
        return "null" if value is None else str(value)
    return json.dumps(value)


def trial_id(overrides: dict[str, Any]) -> str:
    """Stable, readable id: ``<leaf>=<value>`` pairs (shortened) and a hash of the exact overrides.

    Keys are taken in sorted order, so the id does not depend on the order of the axes.
    """
    canonical = json.dumps(overrides, sort_keys=True, default=str)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
    parts = []
    for key, value in sorted(overrides.items()):
        leaf = "seed" if key == SEED_KEY else key.rsplit(".", 1)[-1]
        value_text = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{leaf}={value_text}")
    slug = re.sub(r"[^A-Za-z0-9=.+_-]+", "_", ",".join(parts))[:60].strip("_,")
    return f"{slug}-{digest}" if slug else digest


def parse_cli_axis(option: str, text: str) -> tuple[str, str]:
    """Split a ``--grid``/``--random`` value ``key=...`` into (key, right-hand side)."""
    key, sep, rhs = text.partition("=")
    if not sep or not key.strip() or not rhs.strip():
        raise SweepSpecError(f"{option} {text!r} is not key=value; e.g. {option} model.init_args.lr=[1e-3,2e-3]")
    return key.strip(), rhs.strip()


def parse_grid_values(key: str, text: str) -> list:
    """Parse a ``--grid`` right-hand side: a YAML list such as ``[1.0e-3, 2.0e-3]``."""
    values = yaml.safe_load(text)
    if not isinstance(values, list):
        raise SweepSpecError(f"--grid {key}={text} needs a list of values, e.g. {key}=[0.65,0.75]")
    if not values:
        raise SweepSpecError(f"grid for {key} is empty ([]); give at least one value")
    return [_yaml_number(value) for value in values]


def _yaml_number(value: Any) -> Any:
    # YAML 1.1 reads 1e-3 (no dot) as a string; take it as the number it was meant to be.
    if isinstance(value, str):
        try:
            return float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
        except ValueError:
            return value
    return value


def load_spec(path: str | Path | None = None, *, overrides: dict | None = None) -> SweepSpec:
    """Build a spec from a sweep file (optional) and command-line values that take precedence.

    ``overrides`` may hold ``base_config``, ``fixed``, ``grid`` (key -> list), ``random`` (key -> text),
    ``n_trials``, ``random_seed``, ``seeds``, ``metric``, ``mode``, ``test``, ``name``, ``heatmap``.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SweepSpecError(f"sweep file {path} not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise SweepSpecError(f"sweep file {path} must contain a mapping, not a {type(data).__name__}")
        unknown = sorted(set(data) - _SPEC_FIELDS)
        if unknown:
            raise SweepSpecError(f"sweep file {path} has unknown fields {unknown}; valid: {sorted(_SPEC_FIELDS)}")
    overrides = overrides or {}

    random_section = data.get("random") or {}
    if random_section and not isinstance(random_section, dict):
        raise SweepSpecError(f"random must be a mapping with n_trials, seed, params; got {random_section!r}")
    random_params = dict(random_section.get("params") or {})
    random_params.update(overrides.get("random") or {})
    grid = {key: [_yaml_number(v) for v in values] if isinstance(values, list) else values
            for key, values in (data.get("grid") or {}).items()}
    grid.update(overrides.get("grid") or {})

    base_config = overrides.get("base_config") or data.get("base_config") or []
    if isinstance(base_config, str):
        base_config = [base_config]
    fixed = list(data.get("fixed") or []) + list(overrides.get("fixed") or [])
    name = overrides.get("name") or data.get("name") or (path.stem if path is not None else "sweep")

    def pick(key: str, section_value: Any, default: Any) -> Any:
        # Command line first, then the sweep file, then the default.
        if overrides.get(key) is not None:
            return overrides[key]
        if section_value is not None:
            return section_value
        return default

    return SweepSpec(
        name=str(name),
        base_config=[str(p) for p in base_config],
        fixed=[str(a) for a in fixed],
        grid=grid,
        random={key: Distribution.parse(key, text) for key, text in random_params.items()},
        n_trials=int(pick("n_trials", random_section.get("n_trials"), 1)),
        random_seed=int(pick("random_seed", random_section.get("seed"), 0)),
        seeds=[int(s) for s in pick("seeds", data.get("seeds"), [])],
        metric=str(pick("metric", data.get("metric"), "top1")),
        mode=str(pick("mode", data.get("mode"), "max")),
        test=bool(pick("test", data.get("test"), True)),
        heatmap=list(pick("heatmap", data.get("heatmap"), [])),
        launcher=dict(data.get("launcher") or {}),
        slurm=dict(data.get("slurm") or {}),
    )


def flatten_keys(config: dict, prefix: str = "") -> set[str]:
    """Every dotted key of a nested config, leaves and inner nodes alike."""
    keys = set()
    for name, value in config.items():
        key = f"{prefix}{name}"
        keys.add(key)
        if isinstance(value, dict):
            keys |= flatten_keys(value, prefix=f"{key}.")
    return keys


def check_keys(keys: list[str], valid: set[str]) -> None:
    """Raise ``SweepSpecError`` for the first key not in ``valid``, naming the closest valid keys."""
    for key in keys:
        if key in valid:
            continue
        leaf = key.rsplit(".", 1)[-1]
        same_leaf = sorted(k for k in valid if k.rsplit(".", 1)[-1] == leaf)
        close = difflib.get_close_matches(key, sorted(valid), n=5, cutoff=0.6)
        suggestions = list(dict.fromkeys(same_leaf + close))[:5]
        hint = f"closest valid keys: {', '.join(suggestions)}" if suggestions else "no valid key is close"
        raise SweepSpecError(
            f"sweep key {key!r} is not in the config; {hint} "
            "(list every key with d2v-eval fit --config BASE --print_config)"
        )
