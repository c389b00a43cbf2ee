"""Entry point for `ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/fmnist3.yaml
--sweep jobs/sweeps/k_deepcluster.yaml`.

Joins the cluster the job runs on (RAY_ADDRESS is set by Ray Jobs) and runs the same code as `raydc sweep`.
"""
import sys

from raydc.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
