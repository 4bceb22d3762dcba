"""Information capacity of a permutation-invariant code set (supplemental §1).

All in bits per image, computed with log-gamma because the binomials are astronomically
large (C(4096, 512) has ~2,221 bits).
"""


import matplotlib
import numpy as np
from scipy.special import gammaln

from pivq_jax import visualize

matplotlib.use("Agg")  # headless: TPU VMs and CI have no display

_LN2 = np.log(2.0)


def log2_binomial(n, k):
  """log2 C(n, k) for real n >= k >= 0, via log-gamma."""
  n, k = np.asarray(n, np.float64), np.asarray(k, np.float64)
  return (gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)) / _LN2


def nearest_capacity_bits(k_data, k_img, length, *, table2_convention: bool = False):
  """Upper bound for nearest-neighbour VQ (supplemental eq. 5):
  log2[ C(K_data, K_img) * C(L + K_img - 1, K_img - 1) ].

  K_data: codes used over the dataset; K_img: the most distinct codes any image uses;
  length: L, codes per image.

  `table2_convention`: the paper's Table 2 (K_img=49, L=512, K_data=4096 -> 614 bits) is
  reproduced by C(L + K_img - 1, K_img) in the second factor (614.7 bits); eq. 5 as written
  gives 611.3. The default follows the equation.
  """
  second = k_img if table2_convention else k_img - 1
  return log2_binomial(k_data, k_img) + log2_binomial(length + k_img - 1, second)


def matching_capacity_bits(k_data, length):
  """Matching quantization (supplemental eq. 8): log2 C(K_data, L); every image uses
  exactly L distinct codes."""
  return log2_binomial(k_data, length)


def standard_vq_bits(k, length):
  """A positional VQ bottleneck of L codes from K: L * log2 K (paper §4)."""
  return np.asarray(length, np.float64) * np.log2(k)


def plot_capacity(path, *, length: int = 512, k_img: int | None = 49, k_max: int = 8192,
                  k_data_used=None):
  """A PNG like the paper's Fig. 4: capacity (bits) against codebook size K for standard
  (positional) VQ, PI-VQ with nearest assignment (K_img fixed; omitted when None) and PI-VQ
  with matching.
  `k_data_used`: optionally mark measured (K_data, bits) points, a dict name -> (K, bits).
  Returns the image as uint8[H, W, 3] (for TensorBoard)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (slow import)

  ks = np.unique(np.geomspace(length, k_max, 200).astype(int))
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  ax.plot(ks, standard_vq_bits(ks, length), label=f"standard VQ, L={length} positions")
  if k_img:
    ax.plot(ks, nearest_capacity_bits(ks, min(k_img, length), length),
            label=f"PI-VQ nearest (K_img={k_img})")
  ax.plot(ks, matching_capacity_bits(ks, length), label="PI-VQ matching")
  for name, (k, bits) in (k_data_used or {}).items():
    ax.scatter([k], [bits], zorder=3, label=name)
  ax.set_xscale("log")
  ax.set_xlabel("codebook size K (= K_data)")
  ax.set_ylabel("capacity (bits per image)")
  ax.set_title(f"Capacity of an L={length} code set")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return visualize.save_figure(path, fig)
