"""Regional compilation (cm.compile, --compile): compiled blocks give the eager network's outputs and gradients,
forward-mode AD runs them eagerly, and parameters / copies are unaffected. Compiled with backend aot_eager (the
same Dynamo capture and AOT autograd as inductor, without inductor's C++ code generation, which takes minutes on a
2-core CPU)."""

import copy

import pytest
import torch

from cm.compile import compile_blocks, compiled_block_count
from cm.nn import network_jvp
from cm.script_util import create_model, ncsnpp_defaults

NETWORKS = {
    # one resolution level, so few distinct block shapes (each shape is one Dynamo trace)
    "adm": dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="8",
                num_head_channels=16, use_scale_shift_norm=True, dropout=0.1),
    "ncsnpp": dict(ncsnpp_defaults(), model_type="ncsnpp", image_size=8, num_channels=16, num_res_blocks=1,
                   channel_mult="1", attention_resolutions="8", dropout=0.1),
}  # fmt: skip


def build(name):
    torch.manual_seed(0)
    model = create_model(**NETWORKS[name])
    with torch.no_grad():  # perturb the zero-initialised output layers so every block shapes the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.train()


def step(model, x, t, seed=3):
    """Output and parameter gradients of one forward/backward with fixed dropout masks."""
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(x, t)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", NETWORKS)
def test_compiled_blocks_match_eager_outputs_and_gradients(name):
    eager = build(name)
    compiled = compile_blocks(copy.deepcopy(eager), backend="aot_eager")
    assert compiled_block_count(compiled) == sum(1 for _ in compiled.modules() if hasattr(_, "_cm_compile_settings"))
    assert compiled_block_count(compiled) >= 3
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 30.0])
    out, grads = step(eager, x, t)
    out_c, grads_c = step(compiled, x, t)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-5)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-6)
    # a deep copy (EMA, target networks) runs its own parameters
    twin = copy.deepcopy(compiled)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    assert not torch.allclose(step(twin, x, t)[0], out_c)
    assert torch.equal(step(compiled, x, t)[0], out_c)


def test_forward_mode_ad_runs_the_blocks_eagerly():
    eager = build("adm").eval()
    compiled = compile_blocks(copy.deepcopy(eager), backend="aot_eager")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 30.0])
    tangents = (torch.randn_like(x), torch.ones_like(t))
    with torch.no_grad():
        value, tangent = network_jvp(eager, (x, t), tangents)
        value_c, tangent_c = network_jvp(compiled, (x, t), tangents)
    torch.testing.assert_close(value_c, value)
    torch.testing.assert_close(tangent_c, tangent)


def test_bad_requests_give_one_line_errors():
    with pytest.raises(ValueError, match="unknown compile backend"):
        compile_blocks(build("adm"), backend="tvm")
    with pytest.raises(ValueError, match="found no residual or attention block"):
        compile_blocks(torch.nn.Linear(2, 2))
