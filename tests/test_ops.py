"""Resize operators against direct NumPy versions of PyTorch's formulas."""
import numpy as np
import pytest

from dgcl_jax import ops


def _bilinear_align_corners_np(x, out_h, out_w):
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c), np.float64)
  for i in range(out_h):
    sy = 0.0 if out_h == 1 else i * (h - 1) / (out_h - 1)
    y0 = min(int(np.floor(sy)), h - 1); y1 = min(y0 + 1, h - 1); fy = sy - y0
    for j in range(out_w):
      sx = 0.0 if out_w == 1 else j * (w - 1) / (out_w - 1)
      x0 = min(int(np.floor(sx)), w - 1); x1 = min(x0 + 1, w - 1); fx = sx - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (17, 9)), ((33, 33), (129, 129)), ((9, 12), (4, 5)),
                                          ((1, 1), (6, 3)), ((6, 4), (6, 4))])
def test_bilinear_align_corners_matches_numpy(in_hw, out_hw):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *in_hw, 3)).astype(np.float32)
  got = np.asarray(ops.resize_bilinear_align_corners(x, out_hw))
  want = _bilinear_align_corners_np(x.astype(np.float64), *out_hw)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_bilinear_align_corners_keeps_corners_and_dtype():
  x = np.arange(2 * 4 * 6 * 1, dtype=np.float32).reshape(2, 4, 6, 1)
  y = ops.resize_bilinear_align_corners(x.astype(np.float16), (7, 11))
  assert y.dtype == np.float16 and y.shape == (2, 7, 11, 1)
  y = np.asarray(ops.resize_bilinear_align_corners(x, (7, 11)))
  np.testing.assert_allclose(y[:, [0, 0, -1, -1], [0, -1, 0, -1]], x[:, [0, 0, -1, -1], [0, -1, 0, -1]])


def test_legacy_nearest_matches_pytorch_rule():
  labels = np.arange(513 * 513, dtype=np.int32).reshape(1, 513, 513)
  got = np.asarray(ops.resize_nearest_legacy(labels, (129, 129)))
  idx = np.minimum(np.floor(np.arange(129, dtype=np.float32) * np.float32(513 / 129)).astype(int), 512)
  np.testing.assert_array_equal(got[0], labels[0][idx][:, idx])
  # Unlike half-pixel nearest, the first output pixel samples source 0 and 4 -> 15 picks 0, 3, 7, 11...
  idx4 = ops.legacy_nearest_indices(15, 4)
  np.testing.assert_array_equal(idx4, [0, 3, 7, 11])
