"""A PyTorch model with the reference's layout and key names (REFERENCE.md s.1), for parity tests.

Written from the description of the reference (ResNet v1c + U2PL/DGCL dec_deeplabv3_plus + Aux_Module);
`TorchSegModel(...).state_dict()` has exactly the reference's keys, in its order ('encoder.' /
'decoder.' / 'auxor.'; tests/test_convert.py checks them against tests/data/reference_state_dict_keys.json),
which dgcl_jax.convert.from_torch reads.
"""

import torch
import torch.nn.functional as F
from torch import nn

STAGE_BLOCKS = {14: (1, 1, 1, 1), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  def __init__(self, depth=101, base=64, replace_stride_with_dilation=(False, False, True), multi_grid=True):
    super().__init__()
    self.inplanes, self.dilation = 2 * base, 1
    self.conv1 = nn.Sequential(
        nn.Conv2d(3, base, 3, 2, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
        nn.Conv2d(base, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU(),
        nn.Conv2d(base, 2 * base, 3, 1, 1, bias=False))
    self.bn1 = nn.BatchNorm2d(2 * base)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    blocks = STAGE_BLOCKS[depth]
    self.layer1 = self._make_layer(base, blocks[0])
    self.layer2 = self._make_layer(2 * base, blocks[1], 2, replace_stride_with_dilation[0])
    self.layer3 = self._make_layer(4 * base, blocks[2], 2, replace_stride_with_dilation[1])
    self.layer4 = self._make_layer(8 * base, blocks[3], 2, replace_stride_with_dilation[2], multi_grid)

  def _make_layer(self, planes, blocks, stride=1, dilate=False, multi_grid=False):
    downsample = None
    previous_dilation = self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    if stride != 1 or self.inplanes != planes * 4:
      downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
    grids = [2, 2, 4] if multi_grid else [1] * blocks
    layers = [Bottleneck(self.inplanes, planes, stride, downsample, previous_dilation * grids[0])]
    self.inplanes = planes * 4
    for i in range(1, blocks):
      layers.append(Bottleneck(self.inplanes, planes, dilation=self.dilation * grids[i]))
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    c1 = self.layer1(x)
    c2 = self.layer2(c1)
    c3 = self.layer3(c2)
    c4 = self.layer4(c3)
    return c1, c2, c3, c4


class ASPP(nn.Module):
  def __init__(self, in_planes, inner=256, dilations=(6, 12, 18)):
    super().__init__()
    self.conv1 = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Conv2d(in_planes, inner, 1, bias=False),
                               nn.BatchNorm2d(inner), nn.ReLU())
    self.conv2 = nn.Sequential(nn.Conv2d(in_planes, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU())
    for i, d in enumerate(dilations):
      setattr(self, f"conv{i + 3}", nn.Sequential(
          nn.Conv2d(in_planes, inner, 3, padding=d, dilation=d, bias=False), nn.BatchNorm2d(inner), nn.ReLU()))

  def forward(self, x):
    h, w = x.shape[2:]
    pool = F.interpolate(self.conv1(x), size=(h, w), mode="bilinear", align_corners=True)
    return torch.cat([pool, self.conv2(x), self.conv3(x), self.conv4(x), self.conv5(x)], 1)


class Decoder(nn.Module):
  def __init__(self, in_planes, num_classes, inner=256, low_planes=48, rep_dim=256, dilations=(6, 12, 18),
               low_in=256):
    super().__init__()
    self.low_conv = nn.Sequential(nn.Conv2d(low_in, low_planes, 1), nn.BatchNorm2d(low_planes), nn.ReLU())
    self.aspp = ASPP(in_planes, inner, dilations)
    self.head = nn.Sequential(nn.Conv2d(5 * inner, inner, 3, padding=1, bias=False), nn.BatchNorm2d(inner),
                              nn.ReLU(), nn.Dropout2d(0.1))
    self.classifier = nn.Sequential(
        nn.Conv2d(low_planes + inner, inner, 3, padding=1, bias=True), nn.BatchNorm2d(inner), nn.ReLU(),
        nn.Dropout2d(0.1),
        nn.Conv2d(inner, inner, 3, padding=1, bias=True), nn.BatchNorm2d(inner), nn.ReLU(), nn.Dropout2d(0.1))
    # The reference's final 1x1 conv is a module of its own (`decoder.final.*`), not classifier[8].
    self.final = nn.Conv2d(inner, num_classes, 1, bias=True)
    self.representation = nn.Sequential(nn.Linear(inner, rep_dim), nn.BatchNorm1d(rep_dim), nn.ReLU(),
                                        nn.Linear(rep_dim, rep_dim))

  def forward(self, c1, c4):
    head = self.head(self.aspp(c4))
    low = self.low_conv(c1)
    head = F.interpolate(head, size=low.shape[2:], mode="bilinear", align_corners=True)
    fts = self.classifier(torch.cat([low, head], 1))
    pred = self.final(fts)
    b, c, h, w = fts.shape
    rep = self.representation(fts.permute(0, 2, 3, 1).reshape(-1, c))
    rep = rep.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    return pred, fts, rep


class Aux(nn.Module):
  def __init__(self, in_planes, num_classes, inner=256):
    super().__init__()
    self.aux = nn.Sequential(nn.Conv2d(in_planes, inner, 3, padding=1), nn.BatchNorm2d(inner), nn.ReLU(),
                             nn.Dropout2d(0.1), nn.Conv2d(inner, num_classes, 1))

  def forward(self, x):
    return self.aux(x)


class TorchSegModel(nn.Module):
  """encoder / decoder / auxor, configured from a dgcl_jax model_config."""

  def __init__(self, m):
    super().__init__()
    b = m.base_width
    self.encoder = ResNet(m.depth, b, tuple(m.replace_stride_with_dilation), m.multi_grid)
    self.decoder = Decoder(8 * b * 4, m.num_classes, m.decoder_channels, m.low_level_channels, m.rep_dim,
                           tuple(m.aspp_dilations), low_in=4 * b)
    self.has_aux = bool(m.aux)
    if self.has_aux:
      self.auxor = Aux(4 * b * 4, m.num_classes, m.decoder_channels)

  def forward(self, x):
    c1, _, c3, c4 = self.encoder(x)
    pred, fts, rep = self.decoder(c1, c4)
    out = {"pred": pred, "fts": fts, "rep": rep}
    if self.has_aux:
      out["aux"] = self.auxor(c3)
    return out


def randomize_(model, seed=0):
  """Random weights and non-trivial BN parameters and running statistics, in place."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
        n = mod.num_features
        mod.weight.copy_(0.5 + torch.rand(n, generator=g))
        mod.bias.copy_(0.2 * torch.randn(n, generator=g))
        mod.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
  # Keep residual branches small so 33 random blocks neither explode nor vanish.
  for name, mod in model.named_modules():
    if isinstance(mod, Bottleneck):
      with torch.no_grad():
        mod.bn3.weight.mul_(0.2)
  return model


def state_dict_numpy(model):
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
