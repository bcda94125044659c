"""``d2v-eval sweep``: plan, launch, resume and summarise hyperparameter sweeps.

    d2v-eval sweep experiments/sweeps/digits_lr_layer_decay.yaml --dry-run     # list the trials
    d2v-eval sweep experiments/sweeps/digits_lr_layer_decay.yaml --max_parallel 2
    d2v-eval sweep --config configs/demo.yaml --grid model.init_args.lr=[1e-3,2e-3] \\
        --random model.init_args.drop_path_rate='uniform(0, 0.3)' --n_trials 4 -- --trainer.max_epochs=5
    d2v-eval sweep experiments/sweeps/imagenet_lr_layer_decay.yaml --launcher slurm --no-submit
    d2v-eval sweep --sweep_dir results/sweeps/NAME --summarize

Arguments after ``--`` go unchanged to every trial's ``d2v-eval fit``. Running the same command
again resumes: complete trials are skipped, the others run again.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from d2v_eval.sweep.spec import SweepSpecError, load_spec, parse_cli_axis, parse_grid_values
from d2v_eval.sweep.trial import PLAN_FILE, load_plan

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "submitit-local", "slurm")
DEFAULT_SWEEPS_DIR = "results/sweeps"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2v-eval sweep",
        description="Run a grid or random sweep of d2v-eval fit runs, one process per trial.",
        epilog="Arguments after -- are passed to every trial's d2v-eval fit.",
    )
    parser.add_argument("spec", nargs="?", help="sweep file (YAML); command-line options override its fields")
    parser.add_argument("--config", action="append", dest="base_config",
                        help="base fit config (repeatable); replaces the sweep file's base_config")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2]",
                        help="grid axis over a config key, e.g. model.init_args.lr=[1e-3,2e-3] (repeatable)")
    parser.add_argument("--random", action="append", default=[], metavar="KEY=DIST",
                        help="random axis: uniform(a,b), loguniform(a,b) or choice([..]) (repeatable)")

    parser.add_argument("--n_trials", type=int, help="number of random draws (default 1)")
    parser.add_argument("--random_seed", type=int, help="seed of the random draws (default 0)")
    parser.add_argument("--seeds", help="comma-separated seed_everything values, crossed with all trials")

    parser.add_argument("--name", help="sweep name (default: the sweep file name)")
    parser.add_argument("--sweep_dir", help=f"sweep folder (default: {DEFAULT_SWEEPS_DIR}/NAME)")
    parser.add_argument("--metric", help="validation metric that ranks trials (default top1)")
    parser.add_argument("--mode", choices=("max", "min"), help="max for accuracy, min for loss (default max)")
    parser.add_argument("--no_test", "--no-test", dest="test", action="store_const", const=False,
                        help="do not test after fit (default: test, as d2v-eval fit does)")

    parser.add_argument("--launcher", choices=LAUNCHERS,
                        help="local processes, submitit's local executor, or SLURM through submitit (default local)")
    parser.add_argument("--max_parallel", type=int, help="local launcher: trials at a time (default 1)")
    parser.add_argument("--devices_per_trial", type=int,
                        help="local launcher: GPUs per trial, handed out through CUDA_VISIBLE_DEVICES (default 1)")
    parser.add_argument("--no_submit", "--no-submit", action="store_true",
                        help="slurm: write the sbatch scripts under SWEEP_DIR/slurm/ without submitting")
    parser.add_argument("--array", action="store_true", default=None, help="slurm: submit one job array")
    parser.add_argument("--no_wait", "--no-wait", action="store_true",
                        help="submitit-local: return after submitting (slurm always returns after submitting)")

    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print the trials and their overrides, run nothing")
    parser.add_argument("--summarize", action="store_true", help="only rebuild the summary of SWEEP_DIR")
    parser.add_argument("--no_check", action="store_true",
                        help="skip checking the swept keys against the resolved base config")
    return parser


def _spec_overrides(args, fixed: list[str]) -> dict:
    grid = {}
    for text in args.grid:
        key, rhs = parse_cli_axis("--grid", text)
        grid[key] = parse_grid_values(key, rhs)
    random = dict(parse_cli_axis("--random", text) for text in args.random)
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise SweepSpecError(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1,2") from None
        if not seeds:
            raise SweepSpecError(f"--seeds {args.seeds!r} is empty; give e.g. 0,1,2")
    return {
        "base_config": args.base_config, "fixed": fixed, "grid": grid, "random": random,
        "n_trials": args.n_trials, "random_seed": args.random_seed, "seeds": seeds, "metric": args.metric,
        "mode": args.mode, "test": args.test, "name": args.name,
    }


def _print_trials(plan: dict) -> None:
    from d2v_eval.sweep.trial import is_complete

    sys.stdout.write(f"sweep {plan['name']} in {plan['sweep_dir']}: {len(plan['trials'])} trials\n")
    for trial in plan["trials"]:
        done = " (complete)" if is_complete(plan, trial["trial_id"]) else ""
        sys.stdout.write(f"  {trial['trial_id']}{done}: {' '.join(trial['arguments'])}\n")
    if plan["fixed"]:
        sys.stdout.write(f"every trial also gets: {' '.join(plan['fixed'])}\n")


def main(argv: list[str]) -> int:
    argv = list(argv)
    fixed = []
    if "--" in argv:
        split = argv.index("--")
        argv, fixed = argv[:split], argv[split + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, fixed)
    except SweepSpecError as error:
        sys.stderr.write(f"d2v-eval sweep: error: {error}\n")
        return 2


def _run(args, fixed: list[str]) -> int:
    from d2v_eval.sweep import launchers
    from d2v_eval.sweep.spec import SweepSpec
    from d2v_eval.sweep.summary import summarize

    given_axes = args.spec or args.base_config or args.grid or args.random
    if args.summarize or (not given_axes and args.sweep_dir):
        if not args.sweep_dir:
            raise SweepSpecError("--summarize needs --sweep_dir (the folder with sweep.json)")
        if not (Path(args.sweep_dir) / PLAN_FILE).is_file():
            raise SweepSpecError(f"{Path(args.sweep_dir) / PLAN_FILE} not found; plan the sweep with a sweep file first")
        plan = load_plan(args.sweep_dir)
        if args.summarize:
            sys.stdout.write(summarize(plan))
            return 0
        stored = _spec_from_dict(plan["spec"])
        spec = SweepSpec(**{**stored, "base_config": plan["base_config"], "fixed": plan["fixed"] + fixed})
    else:
        spec = load_spec(args.spec, overrides=_spec_overrides(args, fixed))

    sweep_dir = Path(args.sweep_dir or Path(DEFAULT_SWEEPS_DIR) / spec.name)
    plan = launchers.plan_sweep(spec, sweep_dir, check=not args.no_check)
    if args.dry_run:
        _print_trials(plan)
        return 0

    launcher_config = dict(spec.launcher)
    launcher = args.launcher or launcher_config.get("name", "local")
    if launcher not in LAUNCHERS:
        raise SweepSpecError(f"launcher {launcher!r} is unknown; valid: {', '.join(LAUNCHERS)}")
    slurm = dict(spec.slurm)
    if args.array is not None:
        slurm["array"] = True

    if launcher == "slurm" and args.no_submit:
        scripts = launchers.write_slurm_scripts(plan, slurm)
        sys.stdout.write(f"wrote {len(scripts)} sbatch scripts for {len(plan['trials'])} trials:\n")
        for path in scripts:
            sys.stdout.write(f"  {path}\n")
        sys.stdout.write(f"submit them with: bash {sweep_dir.resolve() / 'slurm' / 'submit.sh'}\n")
        return 0

    launchers.write_plan(plan)
    if launcher == "local":
        status = launchers.run_local(
            plan, max_parallel=args.max_parallel or int(launcher_config.get("max_parallel", 1)),
            devices_per_trial=args.devices_per_trial or int(launcher_config.get("devices_per_trial", 1)),
        )
        waited = True
    else:
        cluster = "local" if launcher == "submitit-local" else "slurm"
        waited = not args.no_wait and cluster == "local"
        status = launchers.run_submitit(plan, cluster=cluster, slurm=slurm, wait=waited)
    if waited:
        sys.stdout.write(summarize(plan))
    else:
        sys.stdout.write(f"submitted; summarise later with: d2v-eval sweep --sweep_dir {sweep_dir} --summarize\n")
    return status


def _spec_from_dict(stored: dict) -> dict:
    """Keyword arguments of ``SweepSpec`` from the ``spec`` stored in a plan."""
    from d2v_eval.sweep.spec import Distribution

    values = dict(stored)
    values["random"] = {key: Distribution.parse(key, text) for key, text in (stored.get("random") or {}).items()}
    return values
