"""Hyperparameter sweeps: grid and random specs expanded into trials, each one ``d2v-eval fit`` process.

Modules: ``spec`` (sweep files, trial expansion and ids), ``trial`` (run one trial, record its status;
standard library only, runnable as a file), ``launchers`` (local processes, submitit locally or on
SLURM), ``summary`` (ranking table and heatmap), ``validation`` (the callback that records a fit's
final validation metrics) and ``cli`` (``d2v-eval sweep``).
"""
