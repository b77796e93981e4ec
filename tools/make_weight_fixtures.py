"""Write the reduced-depth PyTorch reference fixtures of tests/test_weight_import.py (needs torch).

    python tools/make_weight_fixtures.py [--out tests/data/weights]

For each network (a torchxrayvision-layout DenseNet with one input channel, a torchvision
DenseNet and a torchvision basic-block ResNet, all reduced: block config (1, 1, 1, 1),
narrow, 64 px input) it writes ``NAME.safetensors`` (the state dict, randomly initialised
with random batch-norm affine parameters and running statistics measured on the
fixture images (as a trained network's, distinct per channel, so a swapped mean/variance
cannot pass)) and
``NAME.npz`` (``images``: raw 0..255 grey pixels [N, 64, 64, 1]; ``features``: the pooled
features; ``logits``: the linear head; ``probabilities`` for torchxrayvision: sigmoid +
op_norm with the stored ``op_threshs``), computed by the PyTorch forward pass in eval mode.
torchxrayvision itself is used when installed; otherwise its DenseNet layout is rebuilt from
torchvision's (same tensor names, one input channel) and op_norm is written out here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

SEED = 20260524
SIZE = 64
N = 3
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def randomise_bn(model: torch.nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.weight.data = 0.5 + torch.rand(c, generator=generator)
            module.bias.data = 0.2 * torch.randn(c, generator=generator)
            module.running_mean.data = 0.2 * torch.randn(c, generator=generator)
            module.running_var.data = 0.5 + torch.rand(c, generator=generator)
        if isinstance(module, torch.nn.Linear):
            module.bias.data = 0.1 * torch.randn(module.out_features, generator=generator)


def calibrate_bn(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Running statistics from the data (as a trained network has), so activations keep a sane scale."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def op_norm(p: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    try:
        import torchxrayvision as xrv

        return xrv.models.op_norm(p, thresholds)
    except ImportError:
        t = thresholds.expand(p.shape[0], -1)
        out = torch.full_like(p, 0.5)
        known = ~torch.isnan(t)
        below, above = (p < t) & known, ~(p < t) & known
        out[below] = p[below] / (t[below] * 2)
        out[above] = 1.0 - (1.0 - p[above]) / ((1 - t[above]) * 2)
        return out


def xrv_densenet(**kwargs) -> torch.nn.Module:
    try:
        import torchxrayvision as xrv

        return xrv.models.DenseNet(in_channels=1, **kwargs)
    except ImportError:
        model = torchvision.models.DenseNet(**kwargs)
        model.features.conv0 = torch.nn.Conv2d(1, kwargs["num_init_features"], 7, 2, 3, bias=False)
        return model


def torch_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "features"):
        return F.adaptive_avg_pool2d(F.relu(model.features(x)), 1).flatten(1)
    head = model.fc
    model.fc = torch.nn.Identity()
    try:
        return model(x)
    finally:
        model.fc = head


def save(out: Path, name: str, model: torch.nn.Module, images: np.ndarray, x: torch.Tensor,
         thresholds: torch.Tensor | None = None) -> None:
    from safetensors.torch import save_file

    calibrate_bn(model, x)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state.pop("op_threshs", None)
    if thresholds is not None:
        state["op_threshs"] = thresholds
    save_file(state, str(out / f"{name}.safetensors"))
    with torch.no_grad():
        features = torch_features(model, x)
        logits = model.classifier(features) if hasattr(model, "classifier") else model.fc(features)
        arrays = {"images": images, "features": features.numpy(), "logits": logits.numpy()}
        if thresholds is not None:
            arrays["probabilities"] = op_norm(torch.sigmoid(logits), thresholds).numpy()
    np.savez_compressed(out / f"{name}.npz", **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" / "weights"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    images = np.random.default_rng(SEED).integers(0, 256, (N, SIZE, SIZE, 1)).astype(np.uint8)
    grey = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    xrv_input = (2 * grey / 255.0 - 1.0) * 1024.0
    imagenet_input = (grey.repeat(1, 3, 1, 1) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD

    small = dict(growth_rate=8, block_config=(1, 1, 1, 1), num_init_features=16, bn_size=2)
    xrv = xrv_densenet(num_classes=4, **small)
    randomise_bn(xrv, generator)
    thresholds = torch.tensor([0.05, 0.3, float("nan"), 0.7])
    save(out, "xrv_densenet_small", xrv, images, xrv_input, thresholds)

    dense = torchvision.models.DenseNet(num_classes=3, **small)
    randomise_bn(dense, generator)
    save(out, "torchvision_densenet_small", dense, images, imagenet_input)

    resnet = narrow_resnet(generator)
    save(out, "torchvision_resnet_small", resnet, images, imagenet_input)
    for path in sorted(out.iterdir()):
        print(f"{path} {path.stat().st_size} bytes")


def narrow_resnet(generator: torch.Generator) -> torch.nn.Module:
    """torchvision's ResNet with BasicBlocks [1, 1, 1, 1] and widths 8, 16, 32, 64."""
    from torchvision.models.resnet import BasicBlock, ResNet

    class Narrow(ResNet):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self._norm_layer = torch.nn.BatchNorm2d
            self.inplanes, self.dilation, self.groups, self.base_width = 8, 1, 1, 64
            self.conv1 = torch.nn.Conv2d(3, 8, 7, 2, 3, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.relu = torch.nn.ReLU(inplace=True)
            self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
            self.layer1 = self._make_layer(BasicBlock, 8, 1)
            self.layer2 = self._make_layer(BasicBlock, 16, 1, stride=2)
            self.layer3 = self._make_layer(BasicBlock, 32, 1, stride=2)
            self.layer4 = self._make_layer(BasicBlock, 64, 1, stride=2)
            self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(64, 3)

    model = Narrow()
    randomise_bn(model, generator)
    return model


if __name__ == "__main__":
    main()
