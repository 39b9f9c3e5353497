"""Train with training_mode sct (continuous-time consistency training, sCM); run with --help for the flags,
--config FILE.yaml for presets (configs/digits_sct.yaml, configs/cifar10_sct.yaml)."""

from cm.train_cli import main

if __name__ == "__main__":
    main("sct")
