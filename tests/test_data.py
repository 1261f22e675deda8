"""Input pipeline: layouts, transforms, determinism, sharding, resume, validation, bad input."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from configs import cityscapes as cityscapes_config
from configs import pascal as pascal_config
from configs import synthetic as synthetic_config
from dgcl_jax import config_base
from dgcl_jax.data import assemble, pipeline, sources, synthetic, transforms
from dgcl_jax.data.pipeline import DataError

MEAN = np.array(config_base.base_config().data.mean, np.float32)
STD = np.array(config_base.base_config().data.std, np.float32)
NUM_CLASSES = 5


def _encoded_pair(rng, h, w):
  """Label in 12-px blocks of classes 0-4 (some 255), image colour = 40 * class (255 -> 250)."""
  blocks = rng.integers(0, NUM_CLASSES + 1, ((h + 11) // 12, (w + 11) // 12))
  blocks[blocks == NUM_CLASSES] = 255
  label = np.kron(blocks, np.ones((12, 12), np.int64))[:h, :w].astype(np.uint8)
  value = np.where(label == 255, 250, label.astype(np.int64) * 40).astype(np.uint8)
  image = np.stack([value, value, 255 - value], -1)
  return image, label


def _write_pascal(root, ids, sizes, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(root / "JPEGImages", exist_ok=True)
  os.makedirs(root / "SegmentationClassAug", exist_ok=True)
  for name, (h, w) in zip(ids, sizes):
    image, label = _encoded_pair(rng, h, w)
    Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=100, subsampling=0)
    Image.fromarray(label, mode="L").save(root / "SegmentationClassAug" / f"{name}.png")


def _write_list(path, items, trailing_newline=False):
  path.write_text("\n".join(items) + ("\n" if trailing_newline else ""))
  return str(path)


def _pascal_config(tmp_path, n_lab=3, n_unl=8, n_val=5, crop=40, batch=4, slices=2, workers=0):
  root = tmp_path / "voc"
  ids = [f"img_{i:03d}" for i in range(n_lab + n_unl + n_val)]
  rng = np.random.default_rng(1)
  sizes = [(int(rng.integers(40, 71)), int(rng.integers(40, 71))) for _ in ids]
  _write_pascal(root, ids, sizes)
  c = pascal_config.get_config("732")
  c.batch_size, c.num_slices = batch, slices
  d = c.data
  d.root = str(root)
  d.labeled_list = _write_list(tmp_path / "labeled.txt", ids[:n_lab])
  d.unlabeled_list = _write_list(tmp_path / "unlabeled.txt", ids[n_lab:n_lab + n_unl], trailing_newline=True)
  d.val_list = _write_list(tmp_path / "val.txt", ids[n_lab + n_unl:])
  c.model.num_classes = NUM_CLASSES
  d.class_names = tuple(f"c{i}" for i in range(NUM_CLASSES))
  d.crop_size = crop
  d.val_crop_size = 72
  d.num_workers = workers
  return c, ids, sizes


def _denorm(image):
  return image * STD + MEAN


def _dense(batch):
  """The float32 crops and int32 labels the train step makes of a compact pipeline batch."""
  return {k: np.asarray(v) for k, v in assemble.train_batch(batch, *assemble.normalization(MEAN, STD)).items()}


def _take(it, n):
  return [_dense(next(it)) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("in_hw,out_hw", [((13, 17), (26, 30)), ((40, 33), (21, 19)), ((9, 9), (9, 9))])
def test_resize_bilinear_matches_jax_without_antialias(in_hw, out_hw):
  import jax
  x = np.random.default_rng(0).normal(size=in_hw + (3,)).astype(np.float32)
  ours = transforms.resize_bilinear(x, out_hw)
  ref = np.asarray(jax.image.resize(x, out_hw + (3,), "linear", antialias=False))
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_train_transform_equals_full_resize_flip_pad_crop():
  params = transforms.TransformParams(48, tuple(MEAN), tuple(STD), (0.5, 2.0))
  rng_img = np.random.default_rng(3)
  for trial in range(12):
    h, w = int(rng_img.integers(20, 70)), int(rng_img.integers(20, 70))
    image = rng_img.integers(0, 256, (h, w, 3)).astype(np.uint8)
    label = rng_img.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
    out_image, out_label = transforms.train_transform(image, label, np.random.default_rng(trial), params)
    nh, nw, flip, top, left, y0, x0 = transforms._draw(np.random.default_rng(trial), h, w, params)
    full = transforms.resize_bilinear(transforms.normalize(image, MEAN, STD), (nh, nw))
    near = lambda n_in, n_out: np.minimum(
        (np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out))).astype(int), n_in - 1)
    lab = label[near(h, nh)][:, near(w, nw)]  # PyTorch legacy nearest, in float32
    if flip:
      full, lab = full[:, ::-1], lab[:, ::-1]
    ph, pw = max(48 - nh, 0), max(48 - nw, 0)
    full = np.pad(full, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    lab = np.pad(lab.astype(np.int32), ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), constant_values=255)
    np.testing.assert_allclose(out_image, full[y0:y0 + 48, x0:x0 + 48], atol=1e-5)
    np.testing.assert_array_equal(out_label, lab[y0:y0 + 48, x0:x0 + 48])
    ignore = transforms.train_transform(image, None, np.random.default_rng(trial), params)[1]
    np.testing.assert_array_equal(ignore == 255, out_label == 255)  # no 255 in this label: only padding


def test_center_transform_pads_and_crops_centred():
  params = transforms.TransformParams(8, (0.0,) * 3, (1.0,) * 3)
  image = np.arange(5 * 12 * 3, dtype=np.uint8).reshape(5, 12, 3)
  label = np.ones((5, 12), np.uint8)
  out_image, out_label = transforms.center_transform(image, label, params)
  # height 5 -> padded to 8 with top 1; width 12 -> crop offset 2
  np.testing.assert_array_equal(out_label[:1], 255)
  np.testing.assert_array_equal(out_label[6:], 255)
  np.testing.assert_array_equal(out_label[1:6], 1)
  np.testing.assert_array_equal(out_image[1:6], image[:, 2:10].astype(np.float32))
  np.testing.assert_array_equal(out_image[0], 0)


# ----------------------------------------------------------------------------- training stream


def test_steps_per_epoch_reference_splits():
  assert pipeline.steps_per_epoch(pascal_config.get_config("732")) == 615
  assert pipeline.steps_per_epoch(cityscapes_config.get_config("372")) == 163
  c = pascal_config.get_config("732")
  c.steps_per_epoch = 7
  assert pipeline.steps_per_epoch(c) == 7


def test_train_batches_shapes_normalization_alignment(tmp_path):
  c, _, _ = _pascal_config(tmp_path)
  pipeline.check_inputs(c)
  assert pipeline.steps_per_epoch(c) == 2  # floor(ceil(8 / 2) / 2)
  it = pipeline.create_train_iterator(c, 0, 1)
  batches = _take(it, 4)
  b = batches[0]
  assert b["labeled_image"].shape == (4, 40, 40, 3) and b["labeled_image"].dtype == np.float32
  assert b["unlabeled_image"].shape == (4, 40, 40, 3) and b["unlabeled_image"].dtype == np.float32
  assert b["labeled_label"].shape == (4, 40, 40) and b["labeled_label"].dtype == np.int32
  assert b["unlabeled_ignore"].shape == (4, 40, 40) and b["unlabeled_ignore"].dtype == np.int32
  agree, total, padded = 0, 0, 0
  for b in batches:
    for key_img, key_lab in (("labeled_image", "labeled_label"), ("unlabeled_image", "unlabeled_ignore")):
      pad = np.all(b[key_img] == 0, axis=-1)
      assert set(np.unique(b["unlabeled_ignore"])) <= {0, 255}
      if key_lab == "unlabeled_ignore":
        np.testing.assert_array_equal(pad, b[key_lab] == 255)
      else:
        assert np.all(b[key_lab][pad] == 255)
      padded += pad.sum()
    # image colour encodes the label: the red channel is 40 * class (250 where 255)
    red = _denorm(b["labeled_image"])[..., 0]
    lab = b["labeled_label"]
    real = ~np.all(b["labeled_image"] == 0, axis=-1)
    expect = np.where(lab == 255, 250, lab * 40)
    agree += np.sum((np.abs(red - expect) < 12) & real)
    total += real.sum()
    # normalized values stay within the normalized 0-255 range
    lo, hi = (0 - MEAN) / STD, (255 - MEAN) / STD
    assert np.all(b["labeled_image"] >= lo.min() - 1e-4) and np.all(b["labeled_image"] <= hi.max() + 1e-4)
  assert padded > 0  # small images and crop 40: some padding occurs
  assert agree / total > 0.8, agree / total


def test_train_batches_ship_uint8_windows_and_compact_labels(tmp_path):
  """The pipeline ships source pixels as uint8 (max_image_size bounds the window) and uint8 labels."""
  c, _, _ = _pascal_config(tmp_path)
  c.data.max_image_size = (70, 70)
  b = next(pipeline.create_train_iterator(c, 0, 1))
  for stream, label in (("labeled", "labeled_label"), ("unlabeled", "unlabeled_ignore")):
    assert b[f"{stream}_window"].dtype == np.uint8 and b[f"{stream}_window"].shape == (4, 70, 70, 3)
    assert b[f"{stream}_index"].shape == (4, 2, 2, 40) and b[f"{stream}_frac"].shape == (4, 2, 40)
    assert b[label].dtype == np.uint8 and b[label].shape == (4, 40, 40)
  c.data.max_image_size = (50, 80)   # some listed images are taller than 50
  _expect(r"img_\d+\.jpg: image \d+x\d+ \(HxW\) is larger than config.data.max_image_size=\(50, 80\)", _take,
          pipeline.create_train_iterator(c, 0, 1), 4)


def test_pascal_ships_fewer_bytes_per_image():
  """Pascal at crop 513: a 500 x 500 uint8 window, tables and a uint8 label per image, against
  3.2 MB of float32 crop and 1 MB of int32 label."""
  c = pascal_config.get_config("732")
  p = transforms.TransformParams.from_config(c)
  h, w = transforms.window_size(p, c.data.max_image_size)
  compact = h * w * 3 + 2 * 2 * 513 * 4 + 2 * 513 * 4 + 513 * 513
  assert (h, w) == (500, 500)
  assert 4 * compact < 513 * 513 * (3 * 4 + 4)


def test_train_alignment_when_flipped_and_rescaled(tmp_path):
  """Blocks are asymmetric: a flip or scale applied to only one of image and label breaks agreement."""
  c, _, _ = _pascal_config(tmp_path, crop=48)
  it = pipeline.create_train_iterator(c, 0, 1)
  aligned, flipped = [], []
  for b in _take(it, 6):
    for i in range(4):
      real = ~np.all(b["labeled_image"][i] == 0, axis=-1)
      red = _denorm(b["labeled_image"][i])[..., 0]
      lab = b["labeled_label"][i]
      agree = lambda lab: np.mean((np.abs(red - np.where(lab == 255, 250, lab * 40)) < 12)[real])
      aligned.append(agree(lab))
      flipped.append(agree(lab[:, ::-1]))
  # misses are bilinear mixing at block edges only
  assert min(aligned) > 0.7 and np.mean(aligned) > 0.85, aligned
  assert np.mean(aligned) > np.mean(flipped) + 0.3, (np.mean(aligned), np.mean(flipped))


def test_sampling_law_and_epochs(tmp_path):
  c, _, _ = _pascal_config(tmp_path, n_lab=3, n_unl=8, batch=4, slices=2)
  it = pipeline.create_train_iterator(c, 0, 1)
  for epoch in range(2):
    labs, unls = [], []
    for s in range(2):
      lab, unl = it.record_indices(epoch * 2 + s)
      labs += lab
      unls += unl
    assert sorted(unls) == list(range(8))  # each unlabeled image once per epoch
    counts = np.bincount(labs, minlength=3)
    assert counts.min() >= 2 and counts.max() <= 3  # labeled list repeated ceil(8/3)=3 times, 8 drawn
  assert it.record_indices(0) != it.record_indices(2)  # epochs differ


def test_determinism_seed_and_workers(tmp_path):
  c, _, _ = _pascal_config(tmp_path)
  a = _take(pipeline.create_train_iterator(c, 0, 1), 3)
  b = _take(pipeline.create_train_iterator(c, 0, 1), 3)
  assert _same(a, b)
  c.data.num_workers = 2
  it = pipeline.create_train_iterator(c, 0, 1)
  w = _take(it, 3)
  it.close()
  assert _same(a, w)
  c.data.num_workers = 0
  c.seed = 1
  o = _take(pipeline.create_train_iterator(c, 0, 1), 3)
  assert not np.array_equal(a[0]["labeled_image"], o[0]["labeled_image"])


def test_two_processes_cover_the_global_batch(tmp_path):
  c, _, _ = _pascal_config(tmp_path)
  full = _take(pipeline.create_train_iterator(c, 0, 1), 3)
  p0 = _take(pipeline.create_train_iterator(c, 0, 2), 3)
  p1 = _take(pipeline.create_train_iterator(c, 1, 2), 3)
  for f, a, b in zip(full, p0, p1):
    for k in f:
      assert a[k].shape[0] == 2
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), f[k])


def test_resume_from_state(tmp_path):
  c, _, _ = _pascal_config(tmp_path)
  it = pipeline.create_train_iterator(c, 0, 1)
  _take(it, 3)  # crosses the epoch boundary (2 steps per epoch)
  state = it.get_state()
  import json
  state = json.loads(json.dumps(state))
  expected = _take(it, 2)
  resumed = pipeline.create_train_iterator(c, 0, 1)
  resumed.set_state(state)
  assert _same(_take(resumed, 2), expected)
  assert resumed.epoch == 2


# ----------------------------------------------------------------------------- validation


def test_val_center_mode_padding_and_valid(tmp_path):
  c, ids, sizes = _pascal_config(tmp_path, n_val=5)
  assert pipeline.num_val_images(c) == 5
  batches = list(pipeline.create_val_iterator(c, "center", 0, 1, batch_size=4))
  assert len(batches) == 2
  assert batches[0]["image"].shape == (4, 72, 72, 3) and batches[0]["label"].shape == (4, 72, 72)
  assert batches[1]["valid"].tolist() == [True, False, False, False]
  assert np.all(batches[1]["label"][1:] == 255)
  h, w = sizes[-5]  # first val image: centred in 72x72
  top, left = (72 - h) // 2, (72 - w) // 2
  lab = batches[0]["label"][0]
  assert np.all(lab[:top] == 255) and np.all(lab[:, :left] == 255)
  assert np.all(lab[top + h:] == 255) and np.all(lab[:, left + w:] == 255)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "voc" / "SegmentationClassAug" / f"{ids[-5]}.png")),
                                lab[top:top + h, left:left + w])
  # two processes: each image scored once
  p0 = list(pipeline.create_val_iterator(c, "center", 0, 2, batch_size=2))  # per-process batch
  p1 = list(pipeline.create_val_iterator(c, "center", 1, 2, batch_size=2))
  assert len(p0) == len(p1) == 2
  assert sum(b["valid"].sum() for b in p0 + p1) == 5
  np.testing.assert_array_equal(np.concatenate([p0[0]["label"], p1[0]["label"]]), batches[0]["label"])
  full = list(pipeline.create_val_iterator(c, "full", 0, 1))
  assert len(full) == 5 and full[0]["image"].shape == (1, h, w, 3) and full[0]["name"] == ids[-5]
  assert full[0]["label"].dtype == np.int32


# ----------------------------------------------------------------------------- cityscapes, synthetic, helpers


def test_cityscapes_layout(tmp_path):
  root = tmp_path / "cs"
  rng = np.random.default_rng(0)
  items = []
  for split, city, n in (("train", "aachen", 4), ("val", "bonn", 2)):
    os.makedirs(root / "leftImg8bit" / split / city)
    os.makedirs(root / "gtFine" / split / city)
    for i in range(n):
      stem = f"{city}_{i:06d}_000019"
      image, label = _encoded_pair(rng, 40, 80)
      Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
      Image.fromarray(label, mode="L").save(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
      items.append(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png")
  c = cityscapes_config.get_config("372")
  c.batch_size, c.num_slices = 2, 2
  c.data.root = str(root)
  c.data.labeled_list = _write_list(tmp_path / "l.txt", items[:2])
  c.data.unlabeled_list = _write_list(tmp_path / "u.txt", items[2:4])
  c.data.val_list = _write_list(tmp_path / "v.txt", items[4:])
  c.model.num_classes = NUM_CLASSES
  c.data.crop_size, c.data.val_crop_size, c.data.num_workers = 32, 36, 0
  pipeline.check_inputs(c)
  b = _dense(next(pipeline.create_train_iterator(c, 0, 1)))
  assert b["labeled_image"].shape == (2, 32, 32, 3)
  v = list(pipeline.create_val_iterator(c, "center", 0, 1, batch_size=2))[0]
  assert v["label"].shape == (2, 36, 36)
  gt = np.asarray(Image.open(root / "gtFine" / "val" / "bonn" / "bonn_000000_000019_gtFine_labelTrainIds.png"))
  np.testing.assert_array_equal(v["label"][0], gt[2:38, 22:58])  # 40x80 centre-cropped to 36x36


def test_synthetic_dataset():
  a = synthetic.generate(0, "labeled", 3, 64, 5)
  b = synthetic.generate(0, "labeled", 3, 64, 5)
  assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
  assert not np.array_equal(a[0], synthetic.generate(0, "unlabeled", 3, 64, 5)[0])
  assert not np.array_equal(a[0], synthetic.generate(1, "labeled", 3, 64, 5)[0])
  assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8 and a[1].shape == (64, 64)
  counts = np.zeros(5)
  for i in range(40):
    counts += np.bincount(synthetic.generate(0, "val", i, 64, 5)[1].ravel(), minlength=5)
  assert counts.size == 5 and np.all(counts > 0)
  c = synthetic_config.get_config()
  c.batch_size, c.num_slices = 4, 2
  pipeline.check_inputs(c)
  assert pipeline.steps_per_epoch(c) == 64
  b = _dense(next(pipeline.create_train_iterator(c, 0, 1)))
  lab = b["labeled_label"]
  assert b["labeled_image"].shape == (4, 64, 64, 3) and set(np.unique(lab)) <= set(range(5)) | {255}
  assert len(pipeline.create_val_iterator(c, "center", 0, 1)) == 16


def test_palette_and_class_names():
  pal = pipeline.palette(5)
  assert pal.dtype == np.uint8
  assert pal.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
  assert pipeline.class_names(synthetic_config.get_config())[1] == "disc"


def test_tfds_source_if_installed():
  pytest.importorskip("tensorflow_datasets")
  pytest.skip("tensorflow_datasets importable but no local dataset is prepared for tests")


# ----------------------------------------------------------------------------- bad input


def _expect(match, fn, *args):
  with pytest.raises(DataError, match=match) as info:
    fn(*args)
  assert "\n" not in str(info.value)


def test_bad_inputs(tmp_path):
  c, ids, _ = _pascal_config(tmp_path, n_lab=2, n_unl=4, n_val=2, batch=2)
  root = tmp_path / "voc"
  good_root = c.data.root
  c.data.root = str(tmp_path / "nope")
  _expect("nope: dataset root not found", pipeline.check_inputs, c)
  c.data.root = good_root
  c.data.labeled_list = _write_list(tmp_path / "empty.txt", [])
  _expect("empty.txt: split list is empty", pipeline.check_inputs, c)
  c.data.labeled_list = str(tmp_path / "missing.txt")
  _expect("missing.txt: split list not found", pipeline.check_inputs, c)
  c.data.labeled_list = _write_list(tmp_path / "labeled.txt", ids[:2] + ["ghost"])
  _expect("ghost.jpg: image file not found", pipeline.check_inputs, c)
  c.data.labeled_list = _write_list(tmp_path / "labeled.txt", ids[:2])
  os.remove(root / "SegmentationClassAug" / f"{ids[-1]}.png")
  _expect(f"{ids[-1]}.png: label file not found", pipeline.check_inputs, c)
  os.remove(root / "SegmentationClassAug" / f"{ids[3]}.png")  # unlabeled labels are not required
  c.data.val_list = _write_list(tmp_path / "val.txt", ids[-2:-1])
  pipeline.check_inputs(c)

  # read-time problems on a labeled image: corrupt JPEG, bad label values, size mismatch
  (root / "JPEGImages" / f"{ids[0]}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  c.data.labeled_list = _write_list(tmp_path / "labeled.txt", [ids[0]])
  _expect(f"{ids[0]}.jpg: cannot decode image", next, pipeline.create_train_iterator(c, 0, 1))
  bad = np.full((50, 50), 7, np.uint8)
  Image.fromarray(bad, mode="L").save(root / "SegmentationClassAug" / f"{ids[1]}.png")
  c.data.labeled_list = _write_list(tmp_path / "labeled.txt", [ids[1]])
  _expect(r"label values \[7\] outside \[0, 5\)", next, pipeline.create_train_iterator(c, 0, 1))
  Image.fromarray(np.zeros((13, 50), np.uint8), mode="L").save(root / "SegmentationClassAug" / f"{ids[1]}.png")
  _expect("image size .* differs from label size 50x13", next, pipeline.create_train_iterator(c, 0, 1))
  # the same error arrives from a worker process
  c.data.num_workers = 1
  it = pipeline.create_train_iterator(c, 0, 1)
  _expect("differs from label size 50x13", next, it)
  it.close()


def test_unlabeled_list_optional(tmp_path):
  c, _, _ = _pascal_config(tmp_path, n_lab=4, batch=2)
  c.data.unlabeled_list = ""
  assert pipeline.steps_per_epoch(c) == 2
  b = _dense(next(pipeline.create_train_iterator(c, 0, 1)))
  assert b["unlabeled_image"].shape == (2, 40, 40, 3)


def test_load_image_and_normalize(tmp_path):
  c, ids, sizes = _pascal_config(tmp_path)
  image = pipeline.load_image(str(tmp_path / "voc" / "JPEGImages" / f"{ids[0]}.jpg"))
  assert image.shape == sizes[0] + (3,) and image.dtype == np.uint8
  x = pipeline.normalize(image, c)
  np.testing.assert_allclose(x, (image - MEAN) / STD, rtol=1e-5, atol=1e-5)
  assert sources.read_list(c.data.unlabeled_list)[-1] == ids[10]


def test_ground_truth_pseudo_labels_line_up_with_the_unlabeled_images(tmp_path):
  """config.loss.pseudo_labels='ground_truth' adds the unlabeled images' own labels, same crops."""
  c, ids, _ = _pascal_config(tmp_path, crop=48)
  plain = _take(pipeline.create_train_iterator(c, 0, 1), 3)
  assert "unlabeled_label" not in plain[0]
  c.loss.pseudo_labels = "ground_truth"
  pipeline.check_inputs(c)
  agree = []
  for b, p in zip(_take(pipeline.create_train_iterator(c, 0, 1), 3), plain):
    for k in p:
      np.testing.assert_array_equal(b[k], p[k])
    lab = b["unlabeled_label"]
    assert lab.dtype == np.int32
    assert np.all(lab[b["unlabeled_ignore"] == 255] == 255)
    real = b["unlabeled_ignore"] != 255
    red = _denorm(b["unlabeled_image"])[..., 0]
    agree.append(np.mean((np.abs(red - np.where(lab == 255, 250, lab * 40)) < 12)[real]))
  assert np.mean(agree) > 0.85, agree
  # A missing label of an unlabeled image is named before anything runs.
  os.remove(tmp_path / "voc" / "SegmentationClassAug" / f"{ids[3]}.png")
  with pytest.raises(DataError, match=f"{ids[3]}.png: label file not found"):
    pipeline.check_inputs(c)
  c.loss.pseudo_labels = "teacher"
  pipeline.check_inputs(c)


# ----------------------------------------------------------------------------- start-up check of the val set


def test_val_set_checked_at_start(tmp_path):
  """Bad validation files are named by check_inputs (and check_val_inputs), before any training."""
  c, ids, sizes = _pascal_config(tmp_path, n_lab=2, n_unl=4, n_val=3, batch=2)
  labels = tmp_path / "voc" / "SegmentationClassAug"
  pipeline.check_inputs(c)
  (h0, w0), (h1, w1) = sizes[-3], sizes[-2]
  v0, v1 = labels / f"{ids[-3]}.png", labels / f"{ids[-2]}.png"
  good0, good1 = v0.read_bytes(), v1.read_bytes()
  q0, q1 = re.escape(str(v0)), re.escape(str(v1))

  bad = np.zeros((h0, w0), np.uint8)
  bad[5, 5] = 40
  Image.fromarray(bad, mode="L").save(v0)
  for check in (pipeline.check_inputs, pipeline.check_val_inputs):
    _expect(rf"^{q0}: label values \[40\] outside \[0, 5\) and not 255 \(listed in .*val.txt\)$", check, c)
  # Several bad entries: the first in list order is named, the others counted.
  Image.fromarray(np.zeros((h1 + 1, w1), np.uint8), mode="L").save(v1)
  _expect(rf"^{q0}: label values \[40\] .*; 1 more bad entries in this list\)$", pipeline.check_inputs, c)
  v0.write_bytes(good0)
  _expect(rf"^{q1}: image size {w1}x{h1} differs from label size {w1}x{h1 + 1} ", pipeline.check_inputs, c)
  v1.write_bytes(good1[:60])  # truncated: the header survives, the pixels do not
  _expect(rf"^{q1}: cannot decode label ", pipeline.check_inputs, c)
  v1.write_bytes(b"not a png")
  _expect(rf"^{q1}: cannot decode label ", pipeline.check_val_inputs, c)
  Image.fromarray(np.zeros((h1, w1, 3), np.uint8)).save(v1)
  _expect(rf"^{q1}: label image has mode RGB; expected 8-bit 'L' or palette 'P'", pipeline.check_inputs, c)
  Image.fromarray(np.ones((h1, w1), np.uint16)).save(v1)  # 16-bit, although its values would fit
  _expect(rf"^{q1}: label image has mode I;16; expected 8-bit 'L' or palette 'P'", pipeline.check_inputs, c)
  os.remove(v1)
  _expect(rf"^{q1}: label file not found", pipeline.check_val_inputs, c)
  palette_mask = Image.fromarray(np.full((h1, w1), 4, np.uint8), mode="P")
  palette_mask.putpalette(pipeline.palette(256).ravel().tolist())
  palette_mask.save(v1)  # VOC's own format: palette indices are the classes
  pipeline.check_inputs(c)
  palette_mask.putpixel((0, 0), 40)
  palette_mask.save(v1)
  _expect(rf"^{q1}: label values \[40\] outside", pipeline.check_val_inputs, c)
  v1.write_bytes(good1)
  (tmp_path / "voc" / "JPEGImages" / f"{ids[-1]}.jpg").write_bytes(b"garbage")
  _expect(rf"{ids[-1]}.jpg: cannot decode image ", pipeline.check_val_inputs, c)


def test_bad_val_mask_stops_training_before_it_starts(tmp_path, monkeypatch):
  from dgcl_jax import train

  def no_training(*args, **kwargs):
    raise AssertionError("training was set up before the validation set was checked")
  monkeypatch.setattr(train, "StepFunctions", no_training)
  c, ids, sizes = _pascal_config(tmp_path, n_lab=2, n_unl=8, n_val=2, batch=4)
  c.model.pretrained = "none"
  h, w = sizes[-1]
  Image.fromarray(np.full((h, w), 40, np.uint8), mode="L").save(
      tmp_path / "voc" / "SegmentationClassAug" / f"{ids[-1]}.png")
  with pytest.raises(DataError, match=rf"{ids[-1]}.png: label values \[40\]"):
    train.train_and_evaluate(c, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "work" / "checkpoints")


# ----------------------------------------------------------------------------- image modes


def _saved(tmp_path, name, im, **kw):
  path = str(tmp_path / name)
  im.save(path, **kw)
  return path


def test_16_bit_grayscale_images_are_scaled(tmp_path):
  v = np.random.default_rng(0).integers(0, 65536, (7, 9)).astype(np.uint16)
  v[0, :4] = [0, 128, 129, 65535]  # 128 / 257 rounds down, 129 / 257 up
  expect = np.repeat(np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8)[..., None], 3, -1)
  png = _saved(tmp_path, "g16.png", Image.fromarray(v))
  assert Image.open(png).mode == "I;16"
  big_endian = _saved(tmp_path, "g16b.tif", Image.frombytes("I;16B", (9, 7), v.astype(">u2").tobytes()))
  assert Image.open(big_endian).mode == "I;16B"
  int32 = _saved(tmp_path, "g32.tif", Image.fromarray(v.astype(np.int32)))
  assert Image.open(int32).mode == "I"
  for path in (png, big_endian, int32):
    np.testing.assert_array_equal(pipeline.load_image(path), expect)
  assert expect[0, :4, 0].tolist() == [0, 0, 1, 255]
  wide = _saved(tmp_path, "wide.tif", Image.fromarray(np.full((3, 3), 70000, np.int32)))
  _expect(rf"^{re.escape(wide)}: image mode I has values in \[70000, 70000\]; expected \[0, 65535\]$",
          pipeline.load_image, wide)
  floats = _saved(tmp_path, "f.tif", Image.fromarray(np.ones((3, 3), np.float32)))
  _expect(rf"^{re.escape(floats)}: image mode F is not supported", pipeline.load_image, floats)


def test_other_image_modes_load_as_rgb(tmp_path):
  rgb = np.random.default_rng(1).integers(0, 256, (6, 5, 3)).astype(np.uint8)
  alpha = np.random.default_rng(2).integers(0, 256, (6, 5)).astype(np.uint8)
  rgba = _saved(tmp_path, "a.png", Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"))
  np.testing.assert_array_equal(pipeline.load_image(rgba), rgb)  # alpha dropped, colours kept
  la = _saved(tmp_path, "la.png", Image.fromarray(np.dstack([rgb[..., 0], alpha]), mode="LA"))
  np.testing.assert_array_equal(pipeline.load_image(la), np.repeat(rgb[..., :1], 3, -1))
  gray = _saved(tmp_path, "l.png", Image.fromarray(rgb[..., 1], mode="L"))
  np.testing.assert_array_equal(pipeline.load_image(gray), np.repeat(rgb[..., 1:2], 3, -1))
  index = np.arange(30, dtype=np.uint8).reshape(6, 5)
  pal = Image.fromarray(index, mode="P")
  pal.putpalette(rgb.reshape(-1).tolist())  # palette entry k = pixel k's colour
  pal = _saved(tmp_path, "p.png", pal, transparency=3)
  np.testing.assert_array_equal(pipeline.load_image(pal), rgb)
  cmyk = np.zeros((1, 3, 4), np.uint8)
  cmyk[0, 0, 0] = cmyk[0, 1, 3] = 255  # pure cyan, pure black, white
  path = _saved(tmp_path, "c.jpg", Image.fromarray(cmyk, mode="CMYK"), quality=100)
  assert Image.open(path).mode == "CMYK"
  np.testing.assert_allclose(pipeline.load_image(path).astype(int), [[[0, 255, 255], [0, 0, 0], [255, 255, 255]]],
                             atol=3)  # JPEG rounding


def test_labels_must_be_8_bit_or_palette(tmp_path):
  for name, im in (("rgb.png", Image.fromarray(np.zeros((4, 4, 3), np.uint8))),
                   ("i16.png", Image.fromarray(np.ones((4, 4), np.uint16))),
                   ("la.png", Image.fromarray(np.zeros((4, 4, 2), np.uint8), mode="LA"))):
    path = _saved(tmp_path, name, im)
    _expect(rf"^{re.escape(path)}: label image has mode {im.mode}; expected 8-bit 'L' or palette 'P' class indices$",
            sources.load_label, path, NUM_CLASSES)
  path = _saved(tmp_path, "l.png", Image.fromarray(np.full((4, 4), 255, np.uint8), mode="L"))
  assert sources.load_label(path, NUM_CLASSES).tolist() == [[255] * 4] * 4


def test_the_train_iterator_reads_the_split_lists_once(tmp_path, monkeypatch):
  """Its epoch length comes from the split it built (the same number the loop computed before it
  from the lists), not from a second reading of the lists."""
  c, _, _ = _pascal_config(tmp_path, n_unl=9)
  want = pipeline.steps_per_epoch(c)
  assert want == 2   # ceil(9 / 2) // (4 / 2)
  reads = []
  read_list = sources.read_list
  monkeypatch.setattr(sources, "read_list", lambda path: reads.append(path) or read_list(path))
  it = pipeline.create_train_iterator(c, 0, 1)
  assert it.steps_per_epoch == want
  assert sorted(reads) == sorted([c.data.labeled_list, c.data.unlabeled_list, c.data.val_list])
