"""The reference's training entry: --training_mode edm | consistency_distillation | consistency_training | progdist."""

import argparse
import sys

from cm.script_util import TRAINING_MODES
from cm.train_cli import main

DEFAULT_MODE = "consistency_distillation"


def _training_mode(argv):
    """The --training_mode value on the command line or in --config, so the right flag set is built."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--training_mode")
    pre.add_argument("--config")
    try:
        flags, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:  # e.g. a flag without its value: the full parser reports it
        return DEFAULT_MODE
    if flags.training_mode is not None:
        return flags.training_mode
    if not flags.config:
        return DEFAULT_MODE
    import yaml

    try:
        with open(flags.config) as f:
            return (yaml.safe_load(f) or {}).get("training_mode", DEFAULT_MODE)
    except (OSError, yaml.YAMLError):
        return DEFAULT_MODE


if __name__ == "__main__":
    mode = _training_mode(sys.argv[1:])
    main(mode if mode in TRAINING_MODES else DEFAULT_MODE)
