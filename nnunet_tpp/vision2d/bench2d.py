"""``nnunet-tpp bench2d SUITE.yaml``: a 2D benchmark suite, datasets x methods x TPP x seeds (x label
fractions), as data. Every run is one ``train2d`` run in a fresh child process; results are collected into
``results.csv``, ``results.md`` and ``results.png`` (:mod:`nnunet_tpp.vision2d.bench2d_report`).

Suite YAML::

    name: pneumonia_mini             # a title for the report
    out: runs/2d/pneumonia_mini      # the suite folder (relative: to the current directory; --out overrides)
    upstream:                        # optional: MAE pre-training of the whole ViT from random initialisation,
      data: ../data/pneumonia.npz    #   once; the checkpoint becomes every run's `backbone`. Keys: the
      epochs: 20                     #   arguments of vision2d.upstream.pretrain_mae_upstream (arch, img_size,
      batch_size: 128                #   patch_size, in_chans, arch_options default to `defaults`)
    defaults: {arch: vit_tiny, img_size: 32, epochs: 5}   # any Train2dConfig field
    datasets:                        # name -> {task, data, ...any Train2dConfig field}
      pneumonia: {task: cls, data: ../data/pneumonia.npz}
    methods:                         # a PEFT method name, or {name, method, method_options, ...fields}
      - linear_probe
      - full
      - {name: adapter8, method: adapter, method_options: {bottleneck: 8}}
    tpp: [none, mae, dino]           # with TPP only methods that add parameters run (others: a note)
    seeds: [0, 1, 2]
    label_fractions: [1.0]           # optional

Paths in the YAML (dataset ``data``, ``tpp_data``, ``backbone``, ``target_parameters``,
``combine_backbones``, ``upstream.data``) are relative to the YAML file's folder; a path that does not exist
stops the suite before anything runs, naming the setting to fill in. Runs go to
``<out>/<dataset>/<method>/<tpp>/frac<f>/seed<s>``; a run folder with ``metrics.json`` is finished and is
never repeated, so an interrupted suite continues where it stopped. A failed run is reported and the suite
goes on; the exit code is non-zero when any run failed.

Many GPUs and machines (:mod:`~nnunet_tpp.vision2d.bench2d_run`): ``--devices cuda:0,cuda:1`` gives every
concurrent run its own device; ``--shard I/N`` runs the I-th of N deterministic slices, so a job array spreads a
suite over nodes into one shared folder; a lock file per run folder keeps two processes off the same run;
``suite.json`` keeps the folder to this suite; ``--report`` merges whatever is finished.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nnunet_tpp.vision2d.config import PRETEXTS, Train2dConfig

SUITE_KEYS = ("name", "out", "upstream", "defaults", "datasets", "methods", "tpp", "seeds", "label_fractions")
PATH_FIELDS = ("data", "tpp_data", "backbone", "target_parameters")
CONTROLLED = ("out", "seed", "tpp", "label_fraction")  # set by the suite for every run
UPSTREAM_FILE = "upstream/mae_upstream.pth"


class SuiteError(ValueError):
    """An invalid suite YAML (unknown key, missing data path, ...)."""


@dataclass
class Run:
    """One planned ``train2d`` run of a suite."""

    index: int
    dataset: str
    method: str  # the entry's name (folder and table label)
    tpp: str
    label_fraction: float
    seed: int
    values: dict[str, Any]  # Train2dConfig fields (paths absolute)

    @property
    def label(self) -> str:
        """``adapter`` or ``adapter+mae``."""
        return self.method if self.tpp == "none" else f"{self.method}+{self.tpp}"

    @property
    def out(self) -> Path:
        """The run's folder."""
        return Path(self.values["out"])

    @property
    def finished(self) -> bool:
        """True when the run's folder holds ``metrics.json``."""
        return (self.out / "metrics.json").exists()

    def config(self) -> Train2dConfig:
        """The run's validated settings."""
        return Train2dConfig(**self.values)


@dataclass
class Suite:
    """A parsed suite: its runs, the notes on combinations left out, the optional upstream pre-training."""

    name: str
    out: Path
    source: Path
    runs: list[Run]
    notes: list[str] = field(default_factory=list)
    upstream: dict[str, Any] | None = None
    device: str = "auto"


class _Paths:
    """Resolves the YAML's paths against its folder and collects the settings whose path does not exist."""

    def __init__(self, source: Path, check: bool):
        self.source, self.base, self.check, self.missing = source, source.resolve().parent, check, []

    def __call__(self, value, setting: str):
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return [self(v, f"{setting}[{i}]") for i, v in enumerate(value)]
        path = Path(os.path.expanduser(str(value)))
        path = path if path.is_absolute() else Path(os.path.normpath(self.base / path))
        if self.check and not path.exists():
            self.missing.append(f"`{setting}`: {value!r} ({path})")
        return str(path)

    def raise_missing(self) -> None:
        """Raises :class:`SuiteError` naming every setting whose path does not exist."""
        if self.missing:
            raise SuiteError(f"{self.source}: path(s) not found; fill in these setting(s) with the path of your "
                             f"copy (relative paths are taken from the YAML's folder {self.base}); nothing was run:\n  "
                             + "\n  ".join(self.missing))


def _section(values: dict, where: str, paths: _Paths, allowed: set[str]) -> dict:
    """Checks a mapping of Train2dConfig fields and resolves its paths."""
    if not isinstance(values, dict):
        raise SuiteError(f"{paths.source}: `{where}` must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise SuiteError(f"{paths.source}: unknown setting(s) {unknown} in `{where}`; known: {sorted(allowed)}")
    result = dict(values)
    for name in (*PATH_FIELDS, "combine_backbones"):
        if result.get(name) is not None:
            result[name] = paths(result[name], f"{where}.{name}")
    return result


def _methods(entries, paths: _Paths, allowed: set[str]) -> list[tuple[str, dict]]:
    """``[(name, overrides)]`` from the ``methods:`` list."""
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"{paths.source}: `methods` must be a non-empty list")
    result = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise SuiteError(f"{paths.source}: methods[{i}] must be a method name or a mapping with `name`")
        entry = dict(entry)
        name = str(entry.pop("name"))
        entry.setdefault("method", name)
        result.append((name, _section(entry, f"methods[{i}] ({name})", paths, allowed)))
    names = [n for n, _ in result]
    if len(set(names)) != len(names):
        raise SuiteError(f"{paths.source}: method names must be unique, got {names}")
    return result


def _upstream(spec, defaults: dict, out: Path, paths: _Paths) -> dict:
    """The keyword arguments of :func:`~nnunet_tpp.vision2d.upstream.pretrain_mae_upstream`."""
    import inspect

    from nnunet_tpp.vision2d.upstream import pretrain_mae_upstream
    if not isinstance(spec, dict) or "data" not in spec:
        raise SuiteError(f"{paths.source}: `upstream` must be a mapping with at least `data`")
    known = set(inspect.signature(pretrain_mae_upstream).parameters) - {"out_file", "log", "progress"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise SuiteError(f"{paths.source}: unknown setting(s) {unknown} in `upstream`; known: {sorted(known)}")
    kwargs = {k: defaults[k] for k in ("arch", "img_size", "patch_size", "in_chans", "arch_options", "seed")
              if k in defaults and k in known}
    kwargs.update(spec)
    kwargs["data"] = paths(spec["data"], "upstream.data")
    kwargs["out_file"] = str(out / UPSTREAM_FILE)
    return kwargs


def load_suite(path: str | Path, out: str | Path | None = None, device: str | None = None,
               check_paths: bool = True) -> Suite:
    """Reads a suite YAML and plans its runs; every run's settings are validated before anything runs.

    Args:
        path: the YAML file.
        out: replaces the YAML's ``out``.
        device: replaces ``defaults.device`` (and the upstream's device).
        check_paths: raise :class:`SuiteError` for data / checkpoint paths that do not exist (off: only the
            schema is checked, e.g. to list the runs of a recipe whose data is elsewhere).
    """
    from nnunet_tpp import peft
    source = Path(path)
    spec = yaml.safe_load(source.read_text()) or {}
    if not isinstance(spec, dict):
        raise SuiteError(f"{source}: expected a mapping at the top level")
    unknown = sorted(set(spec) - set(SUITE_KEYS))
    if unknown:
        raise SuiteError(f"{source}: unknown key(s) {unknown}; known: {list(SUITE_KEYS)}")
    missing = [k for k in ("name", "out", "datasets", "methods") if k not in spec]
    if missing:
        raise SuiteError(f"{source}: missing key(s) {missing}")
    paths = _Paths(source, check_paths)
    suite_out = Path(out if out is not None else spec["out"]).absolute()
    fields = {f.name for f in dataclasses.fields(Train2dConfig)}
    allowed = fields - set(CONTROLLED)
    defaults = _section(spec.get("defaults") or {}, "defaults", paths, allowed)
    if device is not None:
        defaults["device"] = device
    upstream = None
    if spec.get("upstream") is not None:
        upstream = _upstream(spec["upstream"], defaults, suite_out, paths)
        upstream.setdefault("device", defaults.get("device", "auto"))
        if device is not None:
            upstream["device"] = device
    datasets = spec["datasets"]
    if not isinstance(datasets, dict) or not datasets:
        raise SuiteError(f"{source}: `datasets` must be a non-empty mapping name -> {{task, data, ...}}")
    datasets = {str(n): _section(v, f"datasets.{n}", paths, allowed)
                for n, v in datasets.items()}
    methods = _methods(spec["methods"], paths, allowed)
    paths.raise_missing()
    tpps = [str(t) for t in spec.get("tpp", ["none"])]
    seeds = [int(s) for s in spec.get("seeds", [0])]
    fractions = [float(f) for f in spec.get("label_fractions", [1.0])]
    bad = [t for t in tpps if t not in PRETEXTS]
    if bad or not tpps or not seeds or not fractions:
        raise SuiteError(f"{source}: `tpp` must list values of {PRETEXTS} (got {tpps}); `seeds` and "
                         f"`label_fractions` must not be empty")
    if any(not 0 < f <= 1 for f in fractions):
        raise SuiteError(f"{source}: `label_fractions` are shares of the training labels, each in (0, 1] "
                         f"(got {fractions})")
    runs, notes = [], []
    for dname, dvalues in datasets.items():
        for mname, mvalues in methods:
            values = {**defaults, **dvalues, **mvalues}
            if upstream is not None and values.get("backbone") is not None:
                raise SuiteError(f"{source}: give either `upstream` or a `backbone` (dataset {dname}, method "
                                 f"{mname}), not both")
            if "task" not in values or "data" not in values:
                raise SuiteError(f"{source}: dataset {dname} needs `task` and `data`")
            try:
                method = peft.get_method(values.get("method", "adapter"))
                method.parse_options(values.get("method_options") or {})
            except ValueError as e:
                raise SuiteError(f"{source}: method {mname}: {e}") from None
            for tpp in tpps:
                if tpp != "none" and not method.adds_parameters:
                    note = (f"{mname}+{tpp} left out: {method.name} adds no parameters, and TPP pre-trains only "
                            f"the parameters a method adds")
                    if note not in notes:
                        notes.append(note)
                    continue
                for frac in fractions:
                    for seed in seeds:
                        run_values = {**values, "tpp": tpp, "seed": seed, "label_fraction": frac,
                                      "out": str(suite_out / dname / mname / tpp / f"frac{frac:g}" / f"seed{seed}")}
                        runs.append(Run(0, dname, mname, tpp, frac, seed, run_values))
    runs.sort(key=lambda r: (list(datasets).index(r.dataset), fractions.index(r.label_fraction),
                             seeds.index(r.seed), [m for m, _ in methods].index(r.method), tpps.index(r.tpp)))
    pretrainings: dict[tuple[str, str], str | None] = {}
    for i, run in enumerate(runs, 1):
        run.index = i
        probe = dict(run.values)  # validated now; the upstream checkpoint does not exist yet
        if upstream is not None:
            probe["backbone"] = None
        if not check_paths:
            probe.update(data=str(source), backbone=None, target_parameters=None, tpp_data=None, combine_backbones=[])
        try:
            Train2dConfig(**probe)
            if check_paths:
                _check_pretraining(run.values, upstream is not None, pretrainings)
        except (ValueError, TypeError, OSError) as e:
            raise SuiteError(f"{source}: run {run.dataset} {run.label}: {e}") from None
    return Suite(str(spec["name"]), suite_out, source, runs, notes, upstream, defaults.get("device", "auto"))


def _check_pretraining(values: dict, upstream: bool, cache: dict) -> None:
    """For a method whose options depend on the backbone's pre-training (``partial`` with ``quarter: auto``):
    raises the method's error when a backbone of the run has none known (the upstream MAE has ``mae``)."""
    from nnunet_tpp import peft
    from nnunet_tpp.models.vit_checkpoint import checkpoint_pretraining
    from nnunet_tpp.peft.partial import auto_quarter
    method = values.get("method", "adapter")
    if method != "partial" or peft.get_method(method).parse_options(values.get("method_options") or {}).quarter \
            != "auto":
        return
    files = [values.get("backbone"), *(values.get("combine_backbones") or [])]
    for path in files:
        if upstream and path is None:
            auto_quarter("mae")
            continue
        key = (str(path), str(values.get("backbone_format", "auto")))
        if path is not None and key not in cache:
            cache[key] = checkpoint_pretraining(path, key[1])
        auto_quarter(cache[key] if path is not None else None)


def describe_runs(suite: Suite, shard: tuple[int, int] | None = None) -> list[str]:
    """One line per run (of ``shard``: I, N) with its state (finished / running elsewhere / to run), the notes,
    and the upstream checkpoint's state."""
    from nnunet_tpp.vision2d.bench2d_lock import LOCK_NAME
    from nnunet_tpp.vision2d.bench2d_parallel import in_shard
    runs = [r for r in suite.runs if in_shard(r.index, shard)]
    lines = [f"suite {suite.name}: {len(suite.runs)} runs in {suite.out} "
             f"({sum(r.finished for r in suite.runs)} finished)"
             + (f"; shard {shard[0]}/{shard[1]}: {len(runs)} runs" if shard else "")]
    if suite.upstream is not None:
        done = Path(suite.upstream["out_file"]).exists()
        lines.append(f"upstream MAE pre-training on {suite.upstream['data']}: "
                     f"{'done' if done else 'to run'} -> {suite.upstream['out_file']}")
    for run in runs:
        state = "finished" if run.finished else "locked (running?)" if (run.out / LOCK_NAME).exists() else "to run"
        lines.append(f"  run {run.index}/{len(suite.runs)}: {run.dataset} {run.label} frac {run.label_fraction:g} "
                     f"seed {run.seed}: {state}  ({run.out})")
    lines += [f"  note: {n}" for n in suite.notes]
    return lines
