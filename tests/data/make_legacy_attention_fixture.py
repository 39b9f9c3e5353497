"""Write tests/data/reference_legacy_attention.npz: outputs of openai/consistency_models' own legacy attention path.

Usage (a local checkout of the reference; einops installed, or its folder on PYTHONPATH):

    python tests/data/make_legacy_attention_fixture.py /path/to/consistency_models [out.npz]

The reference's UNetModel never passes `attention_type`, so every AttentionBlock takes its default,
"flash", which imports flash-attn (CUDA only). Running the reference without flash-attn means setting
that default to "legacy"; this script does exactly that, in memory, and so never imports flash_attn.
The legacy path imports einops, the only package needed besides torch and numpy. The reference's `cm`
package is loaded under the name `reference_cm`, so it does not clash with this project's `cm`.

Per case the file holds the UNet config (JSON), the inputs x, t (and y), and two outputs:
  out_fp16  the reference as written: QKVAttentionLegacy casts q, k, v to float16 before the softmax;
  out_fp32  the same code with that one cast made a no-op, so attention runs in float32 like the rest.
Parameters are not stored: each is torch.randn(shape, generator=Generator().manual_seed(1234)) * 0.1,
filled in sorted state-dict key order.
"""

import contextlib
import importlib.util
import json
import os
import sys

import numpy as np
import torch

CASES = {
    # 4 heads of 8 channels, so a wrong (heads, three) vs (three, heads) split changes the output
    "cond16": dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                   attention_resolutions=[2, 4], channel_mult=[1, 2, 2], num_classes=5, num_head_channels=8,
                   use_scale_shift_norm=True, resblock_updown=True),
    "uncond8": dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                    attention_resolutions=[2], channel_mult=[1, 2], num_heads=4),
}


def load_reference_unet(checkout):
    """Import the reference's cm/unet.py (with its cm/nn.py, cm/fp16_util.py, cm/logger.py) as reference_cm.unet."""
    package_dir = os.path.join(checkout, "cm")
    spec = importlib.util.spec_from_file_location(
        "reference_cm", os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["reference_cm"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("reference_cm.unet")


def use_legacy_attention(ref_unet):
    """Make "legacy" the AttentionBlock default, the change that runs the reference without flash-attn."""
    init = ref_unet.AttentionBlock.__init__
    init.__defaults__ = tuple("legacy" if d == "flash" else d for d in init.__defaults__)


@contextlib.contextmanager
def half_cast_is_noop():
    """Within the block, Tensor.half() returns the tensor unchanged (only QKVAttentionLegacy calls it)."""
    original = torch.Tensor.half
    torch.Tensor.half = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.half = original


def fill_parameters(model, seed=1234):
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    model.load_state_dict({k: torch.randn(state[k].shape, generator=g) * 0.1 for k in sorted(state)}, strict=True)


def main(checkout, out_path):
    ref_unet = load_reference_unet(checkout)
    use_legacy_attention(ref_unet)
    arrays = {}
    g = torch.Generator().manual_seed(0)
    for name, cfg in CASES.items():
        model = ref_unet.UNetModel(**cfg).eval()
        assert all(b.attention_type == "legacy" for b in model.modules() if isinstance(b, ref_unet.AttentionBlock))
        fill_parameters(model)
        size = cfg["image_size"]
        x = torch.randn(2, 3, size, size, generator=g)
        t = torch.tensor([0.7, -250.0])
        y = torch.tensor([1, 4]) if cfg.get("num_classes") else None
        with torch.no_grad():
            arrays[f"{name}_out_fp16"] = model(x, t, y).numpy()
            with half_cast_is_noop():
                arrays[f"{name}_out_fp32"] = model(x, t, y).numpy()
        arrays[f"{name}_config"] = np.array(json.dumps(cfg))
        arrays[f"{name}_x"] = x.numpy()
        arrays[f"{name}_t"] = t.numpy()
        if y is not None:
            arrays[f"{name}_y"] = y.numpy()
    np.savez_compressed(out_path, **arrays)
    print(f"wrote {out_path}: " + ", ".join(sorted(arrays)))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_legacy_attention.npz")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else default_out)
