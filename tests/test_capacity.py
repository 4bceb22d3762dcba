"""Capacity formulas (supplemental eqs. 5 and 8) against exact integer arithmetic and the
paper's Table 2."""

import math

import numpy as np
import pytest

from pivq_jax.evaluation import capacity


@pytest.mark.parametrize("n, k", [(10, 3), (50, 25), (300, 7), (4096, 512)])
def test_log2_binomial_matches_exact_integers(n, k):
  exact = math.log2(math.comb(n, k))
  assert capacity.log2_binomial(n, k) == pytest.approx(exact, rel=1e-9)


def test_paper_table_2():
  # CelebA-HQ, L=512, K_data ~ 4096: nearest with K_img=49 -> 614 bits; matching -> 2221.
  # Eq. 5 as written gives 611.3; the table's 614 uses C(L + K_img - 1, K_img).
  assert capacity.nearest_capacity_bits(4096, 49, 512) == pytest.approx(611.28, abs=0.01)
  assert int(capacity.nearest_capacity_bits(4096, 49, 512, table2_convention=True)) == 614
  assert capacity.matching_capacity_bits(4096, 512) == pytest.approx(2221, abs=0.5)
  ratio = capacity.matching_capacity_bits(4096, 512) / capacity.nearest_capacity_bits(
      4096, 49, 512)
  assert 3.5 <= ratio <= 3.7  # the paper's "3.5x" / "3.6x"


def test_small_cases_by_counting():
  # L=2 codes from K_data=3 with at most K_img=2 distinct: subsets {a,b,c} choose 2 = 3
  # working sets, each with multisets of size 2 over 2 symbols = 3 -> bound 9 (eq. 3).
  assert 2 ** capacity.nearest_capacity_bits(3, 2, 2) == pytest.approx(9)
  assert 2 ** capacity.matching_capacity_bits(3, 2) == pytest.approx(3)
  assert capacity.standard_vq_bits(1024, 256) == pytest.approx(2560)


def test_monotone_in_codebook_size():
  ks = np.arange(600, 5000, 100)
  bits = capacity.matching_capacity_bits(ks, 512)
  assert np.all(np.diff(bits) > 0)


def test_capacity_plot(tmp_path):
  image = capacity.plot_capacity(tmp_path / "capacity.png", length=64, k_img=10,
                                 k_max=1024, k_data_used={"run": (300, 200.0)})
  assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 100
  assert (tmp_path / "capacity.png").stat().st_size > 1000
