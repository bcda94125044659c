"""Record queries: config-key lookup with short aliases, filters, evaluated role, trial grouping, best-by."""

from __future__ import annotations

import dataclasses
import logging
import statistics
from datetime import datetime, timezone

from d2v_eval.data.benchmarks import BENCHMARKS

log = logging.getLogger(__name__)

# Returned by ``lookup`` for a key that is not set (None can be a set value).
MISSING = object()

# Split names that are validation data whatever the benchmark (the carved split is the datamodule's).
VALIDATION_SPLIT_NAMES = ("validation_from_train", "val", "valid", "validation")
# Metrics where a smaller value is better; every other metric is maximised by --best-by.
LOWER_IS_BETTER = ("loss",)


def lookup(record: dict, key: str):
    """Value of the dotted ``key`` in ``record``, or ``MISSING``.

    ``key`` is tried as a path in the record itself (``seed``, ``encoder.source``, ``metrics.top1``,
    ``config.trainer.max_epochs``), then in its resolved config (``data.input_size``), then with
    ``init_args`` inserted after the first part, so ``model.lr`` finds ``config.model.init_args.lr``.
    """
    parts = key.split(".")
    for root, path in ((record, parts), (record.get("config") or {}, parts)):
        value = _walk(root, path)
        if value is not MISSING:
            return value
    if len(parts) >= 2:
        return _walk(record.get("config") or {}, [parts[0], "init_args", *parts[1:]])
    return MISSING


def _walk(node, parts: list[str]):
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def format_value(value) -> str:
    """Short text for a config value in labels and warnings (``default`` where the key is unset)."""
    if value is MISSING or value is None:
        return "default"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    return str(value)


def record_role(record: dict) -> str:
    """``"validation"`` or ``"test"``: what the record's split was evaluated as.

    Records store ``role``; for older records without it the split name decides. A split that the
    benchmark registry names as the benchmark's reported split is ``test`` (imagenet-1k reports on
    its ``validation`` split), other validation split names are ``validation``, anything else ``test``.
    """
    role = record.get("role")
    if role in ("validation", "test"):
        return role
    split = str(record.get("split"))
    entry = BENCHMARKS.get(str(record.get("benchmark")))
    if entry is not None and entry.splits.get("test") == split:
        return "test"
    if split in VALIDATION_SPLIT_NAMES:
        return "validation"
    return "test"


def trial_key(record: dict) -> tuple:
    """Records of one trial share this key: ``(sweep, trial)`` when a sweep set both, else the run id."""
    if record.get("sweep") and record.get("trial"):
        return ("trial", str(record["sweep"]), str(record["trial"]))
    return ("run", str(record["run_id"]))


def arch_label(record: dict) -> str:
    """``ViT-B/16``, ``ViT-L/16`` and so on from ``encoder.arch``; ``depth x width`` for other sizes."""
    arch = (record.get("encoder") or {}).get("arch") or {}
    sizes = {(384, 12): "S", (768, 12): "B", (1024, 24): "L", (1280, 32): "H"}
    size = sizes.get((arch.get("embed_dim"), arch.get("depth")))
    patch = arch.get("patch_size")
    if size is None:
        if arch.get("depth") is None:
            return "unknown arch"
        return f"{arch.get('depth')} blocks x {arch.get('embed_dim')} wide, patch {patch}"
    return f"ViT-{size}/{patch}"


@dataclasses.dataclass
class RecordFilter:
    """Conditions a record must meet; every unset field accepts all records.

    ``encoder`` matches a substring of ``encoder.source``; ``tags`` must all be present;
    ``since``/``until`` bound ``created_at`` (inclusive; a bare date means its whole day for ``until``).
    """

    benchmarks: list[str] = dataclasses.field(default_factory=list)
    protocols: list[str] = dataclasses.field(default_factory=list)
    encoders: list[str] = dataclasses.field(default_factory=list)
    tags: list[str] = dataclasses.field(default_factory=list)
    since: datetime | None = None
    until: datetime | None = None

    def accepts(self, record: dict) -> bool:
        if self.benchmarks and record.get("benchmark") not in self.benchmarks:
            return False
        if self.protocols and record.get("protocol") not in self.protocols:
            return False
        source = str((record.get("encoder") or {}).get("source"))
        if self.encoders and not any(pattern in source for pattern in self.encoders):
            return False
        if self.tags and not set(self.tags) <= set(record.get("tags") or []):
            return False
        if self.since is not None or self.until is not None:
            try:
                created = parse_time(str(record.get("created_at")))
            except ValueError as error:
                log.warning("skipping record %s in a date filter: %s", record.get("_path", record.get("run_id")), error)
                return False
            if self.since is not None and created < self.since:
                return False
            if self.until is not None and created > self.until:
                return False
        return True

    def apply(self, records: list[dict]) -> list[dict]:
        return [record for record in records if self.accepts(record)]


def parse_time(text: str, *, end_of_day: bool = False) -> datetime:
    """Parse an ISO date or date-time (UTC where no zone is given); raise ValueError naming the text."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid date {text!r}; use ISO format, e.g. 2026-01-31 or 2026-01-31T12:00") from None
    if end_of_day and len(text) == 10:
        moment = moment.replace(hour=23, minute=59, second=59)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


def metric_value(record: dict, metric: str) -> float | None:
    value = (record.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def validation_score(trial_records: list[dict], metric: str) -> float | None:
    """Mean validation ``metric`` of one trial, or None where the trial has no validation score.

    Validation scores come from validation-role records of the trial, or where there are none from a
    ``validation_metrics`` mapping that a protocol stored in the trial's test record. Test metrics are
    never used.
    """
    scores = [metric_value(r, metric) for r in trial_records if record_role(r) == "validation"]
    scores = [score for score in scores if score is not None]
    if not scores:
        for record in trial_records:
            stored = (record.get("validation_metrics") or {}).get(metric)
            if isinstance(stored, (int, float)):
                scores.append(float(stored))
    return statistics.fmean(scores) if scores else None


@dataclasses.dataclass
class Selection:
    """Test records chosen for one table cell; ``note`` gives the reason when none were chosen."""

    records: list[dict]
    note: str = ""
    chosen_trial: tuple | None = None
    validation_score: float | None = None


def select_test_records(records: list[dict], *, best_by: str | None = None) -> Selection:
    """Pick the test records that fill one cell.

    Without ``best_by``: every test-role record. With ``best_by`` (a metric name): the trial with the
    best validation ``best_by`` (highest, or lowest for a loss), then that trial's test records. A cell
    whose trials have no validation score stays empty rather than falling back to test metrics.
    """
    tests = [record for record in records if record_role(record) == "test"]
    if best_by is None:
        return Selection(tests, note="" if tests else "not run")
    trials: dict[tuple, list[dict]] = {}
    for record in records:
        trials.setdefault(trial_key(record), []).append(record)
    scored = [(validation_score(group, best_by), key) for key, group in trials.items()]
    scored = [(score, key) for score, key in scored if score is not None]
    if not scored:
        return Selection([], note="not run" if not records else f"no validation {best_by}")
    lower_better = best_by in LOWER_IS_BETTER or best_by.endswith("loss")
    score, key = min(scored) if lower_better else max(scored)
    chosen = [record for record in trials[key] if record_role(record) == "test"]
    return Selection(chosen, note="" if chosen else "best trial has no test record",
                     chosen_trial=key, validation_score=score)
