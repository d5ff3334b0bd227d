"""Targets are ops: F.linear inside custom code gets adapters too (PEFT only adapts nn.Linear)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import peftfx
from peftfx.methods.lora import lora_weights


class Mixer(nn.Module):
    """Two projections held as bare parameters and applied with F.linear."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(32, d) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(d, 32) / 32 ** 0.5)
        self.bias = nn.Parameter(torch.randn(32))

    def forward(self, x):
        return F.linear(F.gelu(F.linear(x, self.w_in, self.bias)), self.w_out)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Mixer(), Mixer()])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _eager_reference(net: Net, pm, x: torch.Tensor) -> torch.Tensor:
    """The LoRA math written out in eager PyTorch, reading the adapter tensors peftfx made."""
    def lora(key, h):
        slot = pm.adapters.sites["default"][key]
        a, b = lora_weights(pm.adapters, "default", key)
        return (h @ a.T @ b.T) * slot.scaling

    for i, block in enumerate(net.blocks):
        h = F.linear(x, block.w_in, block.bias) + lora(f"blocks.{i}.w_in", x)
        h = F.gelu(h)
        x = x + F.linear(h, block.w_out) + lora(f"blocks.{i}.w_out", h)
    return net.head(x)


def test_f_linear_in_custom_module_gets_adapters():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 5, 16)
    pm = peftfx.apply(net, peftfx.LoraConfig(r=2, lora_alpha=4, target_modules=["w_in", "w_out"],
                                              init_lora_weights=False), example_inputs=(x,))
    assert sorted(pm.adapters.sites["default"]) == ["blocks.0.w_in", "blocks.0.w_out", "blocks.1.w_in", "blocks.1.w_out"]
    pm.eval()
    with torch.no_grad():
        got = pm(x)
        want = _eager_reference(net, pm, x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        other = torch.randn(7, 5, 16)  # another batch size, same graph
        torch.testing.assert_close(pm(other), _eager_reference(net, pm, other), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, net(x))


def test_custom_module_trains_and_saves(tmp_path):
    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(8, 5, 16), torch.randn(8, 5, 4)
    pm = peftfx.apply(net, peftfx.LoraConfig(r=2, target_modules=["w_in"]), example_inputs={"x": x})
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm.train()
    losses = []
    for _ in range(5):
        loss = F.mse_loss(pm(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    pm.save_pretrained(str(tmp_path))
    again = peftfx.load(net, str(tmp_path), example_inputs=(x,))
    pm.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), pm(x))
