"""Entry point for `ray job submit --working-dir . -- python jobs/dac.py --config jobs/configs/dac_mnist.yaml`.

Joins the cluster the job runs on (RAY_ADDRESS is set by Ray Jobs) and runs the same code as `raydc train`.
"""
import sys

from raydc.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
