"""Train with training_mode consistency_tuning (ECT); run with --help for the flags, --config FILE.yaml for presets."""

from cm.train_cli import main

if __name__ == "__main__":
    main("consistency_tuning")
