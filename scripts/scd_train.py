"""Train with training_mode scd (continuous-time consistency distillation from an EDM teacher, sCM); run with
--help for the flags, --config FILE.yaml for presets (configs/digits_scd.yaml, configs/imagenet64_scd.yaml)."""

from cm.train_cli import main

if __name__ == "__main__":
    main("scd")
