"""compat/torch.py against the installed torch: the compile wrapper's `_orig_mod.` key prefix, `Tensor._version`,
torch.cpu's private feature probes and an instance `forward` shadowing the class's (and put back)."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn

from sftlab.compat import torch as torch_compat


def test_compiled_state_dict_keys_carry_the_prefix_compat_strips():
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = torch.compile(module)  # lazy: nothing compiles until it is called
    assert compiled._orig_mod is module
    state = compiled.state_dict()
    assert all(k.startswith(torch_compat.COMPILED_PREFIX) for k in state)
    stripped = torch_compat.without_compile_prefix(state)
    assert list(stripped) == list(module.state_dict())
    assert all(torch.equal(stripped[k], v) for k, v in module.state_dict().items())
    assert torch_compat.without_compile_prefix(module.state_dict()).keys() == module.state_dict().keys()


def test_version_counter_grows_with_every_in_place_write():
    t = torch.zeros(2, 3, dtype=torch.long)
    v0 = torch_compat.version_counter(t)
    assert isinstance(v0, int)
    _ = t + 1  # out of place: same version
    assert torch_compat.version_counter(t) == v0
    t.add_(1)
    v1 = torch_compat.version_counter(t)
    assert v1 > v0
    t[0].fill_(7)  # through a view
    assert torch_compat.version_counter(t) > v1
    assert torch_compat.version_counter(t.expand(4, 2, 3)) == torch_compat.version_counter(
        t
    )  # views share it


@pytest.mark.parametrize("feature", ["amx_tile", "avx512_bf16"])
def test_cpu_probes_exist(feature):
    assert callable(getattr(torch.cpu, f"_is_{feature}_supported"))
    assert isinstance(torch_compat.cpu_supports(feature), bool)


def test_cpu_probe_that_torch_lacks_says_nothing():
    assert torch_compat.cpu_supports("no_such_feature") is None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def test_replaced_forward_runs_instead_and_is_put_back():
    lin, x = nn.Linear(4, 4), torch.randn(2, 4)
    seen = []
    lin.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch_compat.replaced_forward(lin, _identity):
        assert lin(x) is x  # nn.Module.__call__ runs the instance's forward, and its hooks around it
        assert seen[-1] is x
    assert "forward" not in lin.__dict__
    torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)
    with pytest.raises(RuntimeError), torch_compat.replaced_forward(lin, _identity):
        raise RuntimeError("inside")
    assert "forward" not in lin.__dict__


def test_replaced_forward_puts_back_an_accelerate_hook():
    class Double(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    lin, x = nn.Linear(4, 4), torch.randn(2, 4)
    add_hook_to_module(lin, Double())
    hooked = lin.__dict__["forward"]  # Accelerate keeps its hooked forward on the instance
    with torch_compat.replaced_forward(lin, _identity):
        assert lin(x) is x
    assert lin.__dict__["forward"] is hooked
    torch.testing.assert_close(lin(x), 2 * (x @ lin.weight.T + lin.bias))


def test_autograd_inside_custom_op_differentiates_in_an_ops_implementation():
    @torch.library.custom_op("sftlab_test::square_grad", mutates_args=())
    def square_grad(x: torch.Tensor) -> torch.Tensor:
        y = x.detach().requires_grad_()
        with torch_compat.autograd_inside_custom_op():
            z = (y * y).sum()
        return torch.autograd.grad(z, y)[0]

    assert torch.equal(square_grad(torch.tensor([1.0, 3.0])), torch.tensor([2.0, 6.0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_softmax_in_place_equals_the_out_of_place_kernel(dtype):
    """`softmax_` writes over its input on CPU; the result must be bitwise torch.softmax's (a kernel that
    wrote a row before it finished reading it would not be)."""
    torch.manual_seed(0)
    z = (torch.randn(37, 5003) * 5).to(dtype)
    expected = torch.softmax(z, dim=-1)
    written = z.clone()
    out = torch_compat.softmax_(written)
    assert out.data_ptr() == written.data_ptr()
    assert torch.equal(out, expected)
