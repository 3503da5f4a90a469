"""Writes fixtures/parity/upernet_tiny.safetensors: a PyTorch float64 forward and backward (stored
as float32) of the segmentation head (spectral merge, branches, UPerNet) on fixed encoder features, for
crates/sg-heads/tests/upernet_parity.rs. PyTorch is needed only to regenerate the fixture:

    ~/.cache/sg-torch-venv/bin/python tools/upernet_reference.py

Written from the architecture description in ../shared/SPEC.md and the original's layer list
(conv1x1 / GroupNorm 32 / GELU / ConvTranspose branches; pyramid max pooling 1, 2, 3, 6; FPN fuse
with GroupNorm 16 and align_corners=True resizing)."""
import json

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
N, T, H, W, D = 2, 4, 6, 6, 32
C, FP, CLASSES = 128, 16, 3


def block(inp, out, groups):
    return nn.Sequential(nn.Conv2d(inp, out, 1), nn.GroupNorm(groups, out), nn.GELU())


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(T, 1))
        mid, outs = [C // 4, C // 4, C // 2, C], [C // 8, C // 4, C // 2, C]
        for i in range(4):
            layers = list(block(D, mid[i], 32))
            if i < 3:
                k = [8, 4, 2][i]
                layers.append(nn.ConvTranspose2d(mid[i], outs[i], k, k))
            setattr(self, f"conv{i}", nn.Sequential(*layers))
        dec = nn.Module()
        ppm = nn.Module()
        ppm.psp_modules = nn.ModuleList([nn.Sequential(nn.AdaptiveMaxPool2d(s), nn.Conv2d(C, FP, 1)) for s in (1, 2, 3, 6)])
        ppm.final = block(C + 4 * FP, FP, 16)
        dec.PPMHead = ppm
        for k, inp in [(1, C // 2), (2, C // 4), (3, C // 8)]:
            setattr(dec, f"Conv_fuse{k}", block(inp, FP, 16))
            setattr(dec, f"Conv_fuse{k}_", block(FP, FP, 16))
        dec.fuse_all = block(4 * FP, FP, 16)
        dec.conv_x1 = nn.Conv2d(FP, FP, 1)
        self.decoder = dec
        self.cls_seg = nn.Sequential(nn.Conv2d(FP, CLASSES, 3, padding=1))

    def forward(self, feats):
        x = feats.reshape(N, T, H * W, D).permute(0, 2, 3, 1)
        x = self.fc(x).reshape(N, H, W, D).permute(0, 3, 1, 2)
        f = [self.conv0(x), self.conv1(x), self.conv2(x), self.conv3(x)]
        d = self.decoder
        top = f[3]
        up = lambda v, size: F.interpolate(v, size=size, mode="bilinear", align_corners=True)
        pooled = [up(m(top), top.shape[-2:]) for m in d.PPMHead.psp_modules]
        x1 = d.PPMHead.final(torch.cat(pooled + [top], 1))
        x = d.conv_x1(up(x1, f[2].shape[-2:])) + d.Conv_fuse1(f[2])
        x2 = d.Conv_fuse1_(x)
        x = up(x2, f[1].shape[-2:]) + d.Conv_fuse2(f[1])
        x3 = d.Conv_fuse2_(x)
        x = up(x3, f[0].shape[-2:]) + d.Conv_fuse3(f[0])
        x4 = d.Conv_fuse3_(x)
        size = x4.shape[-2:]
        x = d.fuse_all(torch.cat([up(x1, size), up(x2, size), up(x3, size), x4], 1))
        return self.cls_seg(x)


model = Head()
with torch.no_grad():
    for n, p in model.named_parameters():
        if p.dim() == 1 and (n.endswith(".1.weight") or n.endswith(".1.bias")):
            p.add_(0.1 * torch.randn_like(p))  # GroupNorm affine off its identity start
    for p in model.parameters():
        p.copy_(p.float().double())  # exactly representable in f32, so f32 stores hold the same model
feats = torch.randn(N, T * H * W, D).float().double().requires_grad_()
logits = model(feats)
labels = torch.randint(0, CLASSES, (N, 8 * H, 8 * W))
labels[0, :3, :] = 255
weights = torch.tensor([0.5, 2.0, 1.0])
loss = F.cross_entropy(logits, labels, weight=weights, ignore_index=255)
loss.backward()

out = {"input.features": feats.detach(), "input.labels": labels.to(torch.float64), "input.weights": weights,
       "output.logits": logits.detach(), "output.loss": loss.detach().reshape(1), "grad.features": feats.grad}
for n, p in model.named_parameters():
    out["param." + n] = p.detach()
    out["grad." + n] = p.grad
meta = {"config": json.dumps({"batch": N, "t": T, "grid": [H, W], "embed_dim": D, "channels": C, "fpn": FP,
                              "classes": CLASSES}), "torch": torch.__version__}
save_file({k: v.float().contiguous() for k, v in out.items()}, "fixtures/parity/upernet_tiny.safetensors", metadata=meta)
print("wrote fixtures/parity/upernet_tiny.safetensors:", len(out), "tensors, loss", loss.item())
