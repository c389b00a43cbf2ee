"""Entry point for `ray job submit --working-dir . -- python jobs/dec.py --config jobs/configs/dec_mnist.yaml`.

DEC runs on the same engine as DeepCluster; the config's `method: dec` selects it.
"""
import sys

from raydc.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
