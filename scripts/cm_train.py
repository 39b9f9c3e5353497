"""The reference's training entry: any --training_mode (edm, consistency_distillation, consistency_training,
progdist, ...) with the reference's flag defaults; run with --help for the flags, --config FILE.yaml for presets."""

from cm.train_cli import main

if __name__ == "__main__":
    main(None)
