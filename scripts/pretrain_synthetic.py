"""Pretrains the synthetic config's backbone on image-level labels, the analogue of ImageNet init.

  python scripts/pretrain_synthetic.py --config=configs/synthetic.py --output=runs/synthetic_backbone
  python -m dgcl_jax.main --config=configs/synthetic.py --workdir=runs/synth_pt \
      --config.model.pretrained=runs/synthetic_backbone

The published runs start from an ImageNet-pretrained ResNet: features learned from image-level
class labels on other images. This does the same for the synthetic dataset: images of a separate
split ('pretrain', disjoint from the labeled, unlabeled and validation images for every seed)
with multi-hot targets "which object classes appear" (no masks), a sigmoid cross-entropy head
on the globally pooled last stage, SGD with momentum and a cosine schedule. It writes a
backbone-only orbax directory that `config.model.pretrained` loads (as a converted resnet101.pth).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_dataset(num_images: int, seed: int, size: int, num_classes: int):
  """-> images uint8 [N, size, size, 3], targets float32 [N, num_classes - 1] (class present)."""
  from dgcl_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  images = np.empty((num_images, size, size, 3), np.uint8)
  targets = np.zeros((num_images, num_classes - 1), np.float32)
  for i in range(num_images):
    image, label = synthetic.generate(seed, "pretrain", i, size, num_classes)
    images[i] = image
    present = np.unique(label)
    targets[i, present[present > 0] - 1] = 1.0
  return images, targets


def pretrain(config, *, num_images: int, steps: int, batch_size: int, lr: float, seed: int,
             log_every: int = 50, log=print):
  """Trains backbone + linear head; -> ({'params': {'backbone'}, 'batch_stats': {'backbone'}}, history).

  history: list of (step, mean loss over the last `log_every` steps).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from dgcl_jax import models  # pylint: disable=g-import-not-at-top
  from dgcl_jax.data import transforms  # pylint: disable=g-import-not-at-top

  m, d = config.model, config.data
  if d.name != "synthetic":
    raise SystemExit(f"config.data.name={d.name!r}: this script pretrains for the synthetic dataset only")
  num_targets = config.model.num_classes - 1

  class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      feats = models.ResNet(m.depth, m.base_width, tuple(m.replace_stride_with_dilation), m.multi_grid,
                            m.zero_init_residual, m.bn_momentum, m.bn_epsilon, name="backbone")(x, train)
      return nn.Dense(num_targets, name="head")(jnp.mean(feats[3], axis=(1, 2)))

  t0 = time.perf_counter()
  images, targets = make_dataset(num_images, seed, d.synthetic_image_size, config.model.num_classes)
  log(f"generated {num_images} images of {d.synthetic_image_size}x{d.synthetic_image_size} "
      f"in {time.perf_counter() - t0:.1f} s; class frequency {np.round(targets.mean(0), 2).tolist()}")
  mean, std = tuple(d.mean), tuple(d.std)

  model = Classifier()
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.PRNGKey(seed), jnp.zeros((1, d.synthetic_image_size, d.synthetic_image_size, 3)), train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.chain(optax.add_decayed_weights(1e-4),
                   optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
      return optax.sigmoid_binary_cross_entropy(logits, y).mean(), updates["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  rng = np.random.default_rng(seed)
  history, running = [], []
  t0 = time.perf_counter()
  for i in range(1, steps + 1):
    idx = rng.integers(0, num_images, batch_size)
    batch = images[idx]
    flip = rng.random(batch_size) < 0.5
    batch[flip] = batch[flip, :, ::-1]
    x = transforms.normalize(batch, mean, std)
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, targets[idx])
    running.append(loss)
    if i % log_every == 0 or i == steps:
      value = float(np.mean(jax.device_get(running)))
      running = []
      history.append((i, value))
      rate = i * batch_size / (time.perf_counter() - t0)
      log(f"step {i}/{steps} | loss {value:.4f} | {rate:.0f} img/s")
  backbone = {"params": {"backbone": params["backbone"]}, "batch_stats": {"backbone": batch_stats["backbone"]}}
  return jax.device_get(backbone), history


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--output", required=True, help="orbax directory to write (must not exist unless --force)")
  p.add_argument("--num_images", type=int, default=16384)
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--force", action="store_true")
  args = p.parse_args(argv)
  if os.path.exists(args.output) and not args.force:
    raise SystemExit(f"--output {args.output!r} exists; pass --force to overwrite")
  for name in ("num_images", "steps", "batch_size"):
    if getattr(args, name) <= 0:
      raise SystemExit(f"--{name}={getattr(args, name)}: must be positive")
  from dgcl_jax import config_base  # pylint: disable=g-import-not-at-top
  try:
    config = config_base.load_config_file(args.config)
  except config_base.ConfigError as e:
    raise SystemExit(f"--config: {e}") from e
  from dgcl_jax import convert  # pylint: disable=g-import-not-at-top
  variables, _ = pretrain(config, num_images=args.num_images, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed)
  convert.save_variables(args.output, variables, force=args.force)
  print(f"wrote {args.output}: load it with --config.model.pretrained={args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
