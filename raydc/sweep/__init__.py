"""Ray Tune sweeps over any run-config field (`raydc sweep`), each trial a full raydc run.

config.py: the typed sweep file; space.py: trial configs and Tune's search space; trial.py: the Tune function
trainable; select.py: the label-free choice of a winner; outputs.py: trials.csv, best.yaml, report/;
runner.py: the driver that ties them together.
"""
