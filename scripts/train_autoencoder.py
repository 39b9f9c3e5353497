"""Train the small autoencoder of cm.latent, so that any training mode can run in its latent space (--autoencoder_path).

    python scripts/train_autoencoder.py --output ae_digits16                 # digits at 16 px -> 4 x 8 x 8 latents
    python scripts/cm_train.py --config configs/digits_edm.yaml --autoencoder_path ae_digits16 ...

The folder gets config.json and model.safetensors. After training, the latents' scaling factor is set so that
their standard deviation over the data is --latent_std (0.5, the denoisers' sigma_data). Data, batches and seeds
work as in training (cm.image_datasets.load_data); the default 2,000 Adam steps take a few minutes on a CPU.
"""

import argparse
import os
import time

import torch

from cm.image_datasets import load_data
from cm.latent import Autoencoder, autoencoder_loss
from cm.script_util import run_or_exit


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's lines and shows every default."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output", required=True, help="folder to write config.json and model.safetensors to")
    p.add_argument("--data_dir", default="digits_train", help="training images (as --data_dir of the training scripts)")
    p.add_argument("--image_size", type=int, default=16, help="image side in pixels")
    p.add_argument("--latent_channels", type=int, default=4, help="channels of the latents")
    p.add_argument("--channels", type=int, default=32, help="width of the convolutions")
    p.add_argument("--levels", type=int, default=1, help="2x downsamplings (latent side = image_size / 2^levels)")
    p.add_argument("--steps", type=int, default=2000, help="Adam steps")
    p.add_argument("--batch_size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (decays linearly to 0)")
    p.add_argument("--latent_std", type=float, default=0.5, help="standard deviation the scaled latents get")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--log_interval", type=int, default=100, help="steps between loss lines")
    return p.parse_args(argv)


def train(opts):
    """Train an Autoencoder from the options; returns it with its scaling factor set."""
    torch.manual_seed(opts.seed)
    model = Autoencoder(3, opts.latent_channels, opts.channels, opts.levels).to(opts.device)
    data = load_data(data_dir=opts.data_dir, batch_size=opts.batch_size, image_size=opts.image_size, seed=opts.seed)
    opt = torch.optim.Adam(model.parameters(), lr=opts.lr)
    start, loss = time.time(), None
    for step in range(opts.steps):
        for group in opt.param_groups:
            group["lr"] = opts.lr * (1 - step / opts.steps)
        images, _ = next(data)
        loss = autoencoder_loss(model, images.to(opts.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % opts.log_interval == 0 or step == opts.steps - 1:
            print(f"step {step}: reconstruction loss {loss.item():.5f} ({time.time() - start:.0f} s)", flush=True)
    with torch.no_grad():  # the latents' spread over a few batches sets the scaling factor
        latents = torch.cat([model.encoder(next(data)[0].to(opts.device)) for _ in range(8)])
    model.config["scaling_factor"] = opts.latent_std / latents.std().item()
    return model.cpu()


def main(argv=None):
    """Train and save the autoencoder; any failure ends in one 'error:' line (cm.script_util.run_or_exit)."""
    return run_or_exit(train_and_save, parse_args(argv))


def train_and_save(opts):
    """Train the autoencoder of `opts` and write it to --output; returns that folder."""
    model = train(opts)
    model.save(opts.output)
    print(f"saved {os.path.join(opts.output, 'config.json')} (latents {opts.latent_channels} x "
          f"{opts.image_size // 2 ** opts.levels}^2, scaling factor {model.scaling_factor:.4f})")
    return opts.output


if __name__ == "__main__":
    main()
