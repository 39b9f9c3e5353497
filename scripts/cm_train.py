"""The reference's training entry: --training_mode edm | consistency_distillation | consistency_training | progdist."""

import sys

from cm.train_cli import main


def _training_mode(argv):
    """The --training_mode value on the command line or in --config, so the right flag set is built."""
    for i, arg in enumerate(argv):
        if arg == "--training_mode" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--training_mode="):
            return arg.split("=", 1)[1]
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path:
            import yaml

            try:
                with open(path) as f:
                    return (yaml.safe_load(f) or {}).get("training_mode", "consistency_distillation")
            except (OSError, yaml.YAMLError):
                return "consistency_distillation"
    return "consistency_distillation"


if __name__ == "__main__":
    mode = _training_mode(sys.argv[1:])
    main(mode if mode in ("edm", "consistency_distillation", "consistency_training", "progdist") else "consistency_distillation")
