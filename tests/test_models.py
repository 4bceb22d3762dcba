"""The PI-VQ autoencoder: UT trunk parity, shapes, and order-free decoding."""

import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_fast
from pivq_jax.models import autoencoder
from pivq_jax.models import trunk
from pivq_jax.quantizers import vq


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_ut_256px_trunk_parameter_counts():
  # UT's CelebA-HQ/FFHQ trunk with D=256; UT builds unused 1x1 skips, hence the switch.
  kw = dict(nf=128, ch_mult=(1, 1, 2, 2, 4), res_blocks=2, attn_resolutions=(16,),
            ut_unused_skip=True)
  enc = jax.eval_shape(trunk.Encoder(out_ch=256, **kw).init, jax.random.key(0),
                       jnp.zeros((1, 256, 256, 3)))
  dec = jax.eval_shape(trunk.Decoder(**kw).init, jax.random.key(0),
                       jnp.zeros((1, 16, 16, 256)))
  assert _count(enc) == 30_349_568
  assert _count(dec) == 35_020_291


@pytest.mark.slow
def test_unused_skip_switch_changes_only_parameter_count():
  kw = dict(nf=32, ch_mult=(1, 2), res_blocks=1, attn_resolutions=())
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  plain = trunk.Encoder(out_ch=8, **kw)
  quirky = trunk.Encoder(out_ch=8, ut_unused_skip=True, **kw)
  p_plain = traverse_util.flatten_dict(jit_fast(plain.init)(jax.random.key(0), x))
  p_quirky = traverse_util.flatten_dict(jit_fast(quirky.init)(jax.random.key(0), x))
  extra = set(p_quirky) - set(p_plain)
  assert extra and all("conv_out" in k for k in extra)
  # Same shared weights -> identical outputs: the extra parameters are never used.
  p_quirky.update(p_plain)
  np.testing.assert_allclose(
      quirky.apply(traverse_util.unflatten_dict(p_quirky), x),
      plain.apply(traverse_util.unflatten_dict(p_plain), x), atol=1e-6)


# Tests here check shapes, equalities and init scales, not particular draws: "rbg" keys
# compile in a fraction of the time threefry takes for a whole model's initialisers.
_FAST_KEY = jax.random.key(1, impl="rbg")


def _small_model(assignment="nearest"):
  return autoencoder.PIVQAutoencoder(
      resolution=32, nf=32, ch_mult=(1, 2, 2), res_blocks=1, attn_resolutions=(8,),
      emb_dim=32, num_latents=12, tfm_layers=2, tfm_heads=4, tfm_mlp_dim=64,
      quantizer=vq.VectorQuantizer(num_codes=40, dim=32, assignment=assignment))


@pytest.fixture(scope="module")
def small():
  """(model, params, jitted apply): one init shared by the tests below (parameters do not
  depend on the batch), and applies jitted whole rather than run op by op."""
  model = _small_model()
  params = jit_fast(model.init)(_FAST_KEY, jnp.zeros((1, 32, 32, 3)))
  return model, params, jax.jit(model.apply, static_argnames=("method", "quantize"))


def test_shapes_and_methods(small):
  _, params, apply = small
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
  z_e = apply(params, x, method="encode")
  assert z_e.shape == (3, 12, 32) and z_e.dtype == jnp.float32
  idx = apply(params, x, method="encode_to_indices")
  assert idx.shape == (3, 12) and idx.dtype == jnp.int32
  x_hat, aux = apply(params, x)
  assert x_hat.shape == x.shape
  # Decoding the indices equals decoding the quantized vectors.
  z_q, _ = apply(params, z_e, method="quantize")
  np.testing.assert_allclose(apply(params, idx, method="decode_indices"),
                             apply(params, z_q, method="decode"), atol=1e-5)
  np.testing.assert_allclose(x_hat, apply(params, z_q, method="decode"), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("input_std, output_std", [(1.0, 0.0), (0.0, 1.0)])
def test_position_init_scales(input_std, output_std):
  """input_pos_std / output_pos_std set their own embedding's scale; 0 falls back to
  embed_std, and the latent queries always keep embed_std."""
  model = _small_model().clone(input_pos_std=input_std, output_pos_std=output_std, nf=8,
                               ch_mult=(1, 2), attn_resolutions=(), norm_groups=4,
                               tfm_layers=1)  # only the embeddings matter here
  params = jit_fast(model.init)(_FAST_KEY, jnp.zeros((1, 32, 32, 3)))["params"]
  stds = {k: float(jnp.std(params[k]))
          for k in ("input_positions", "output_embeddings", "latent_queries")}
  np.testing.assert_allclose(stds["input_positions"], input_std or 0.02, rtol=0.1)
  np.testing.assert_allclose(stds["output_embeddings"], output_std or 0.02, rtol=0.1)
  np.testing.assert_allclose(stds["latent_queries"], 0.02, rtol=0.15)


def test_trunk_init_schemes():
  """"flax": lecun-normal kernels and zero biases; "torch": PyTorch's Conv2d default, kernels
  and biases uniform in +-1/sqrt(fan_in). The parameter tree is the same."""
  enc = functools.partial(trunk.Encoder, nf=16, ch_mult=(1, 2), res_blocks=1,
                          attn_resolutions=(8,), out_ch=32, norm_groups=4)
  x = jnp.zeros((1, 16, 16, 3))
  flax_p = jit_fast(enc().init)(_FAST_KEY, x)["params"]
  torch_p = jit_fast(enc(init_scheme="torch").init)(_FAST_KEY, x)["params"]
  assert jax.tree.structure(flax_p) == jax.tree.structure(torch_p)
  convs = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(torch_p)[0]
           if path[-1].key in ("kernel", "bias") and "GroupNorm" not in str(path)]
  assert len(convs) > 20
  for path, leaf in convs:
    kernel = torch_p
    for p in path[:-1]:
      kernel = kernel[p.key]
    kernel = kernel["kernel"]
    bound = float(np.prod(kernel.shape[:-1])) ** -0.5
    assert float(jnp.max(jnp.abs(leaf))) <= bound, path
    if leaf.size >= 256:  # uniform in +-bound: std bound / sqrt(3)
      np.testing.assert_allclose(float(jnp.std(leaf)), bound / 3 ** 0.5, rtol=0.15)
  k = flax_p["Conv_0"]["kernel"]  # 3x3x3 -> 16: lecun normal, std 1/sqrt(27)
  np.testing.assert_allclose(float(jnp.std(k)), 27 ** -0.5, rtol=0.2)
  assert not np.any(flax_p["Conv_0"]["bias"]) and np.any(torch_p["Conv_0"]["bias"])
  with pytest.raises(ValueError, match="Unknown trunk init"):
    enc(init_scheme="kaiming").init(_FAST_KEY, x)


def test_quantize_flag_bypasses_the_quantizer(small):
  _, params, apply = small
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  z_e = apply(params, x, method="encode")
  x_hat, aux = apply(params, x, quantize=False)
  np.testing.assert_allclose(x_hat, apply(params, z_e, method="decode"), atol=1e-5)
  assert aux is None
  x_hat_q, aux_q = apply(params, x, quantize=True)
  assert float(aux_q["loss"]) > 0.0
  assert not np.allclose(x_hat, x_hat_q)


def test_decoder_is_invariant_to_code_order(small):
  _, params, apply = small
  codes = jax.random.normal(jax.random.key(2), (4, 12, 32))
  ref = apply(params, codes, method="decode")
  for seed in range(5):
    perm = jax.random.permutation(jax.random.key(10 + seed), 12)
    out = apply(params, codes[:, perm], method="decode")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def test_decoder_sees_code_content(small):
  # Guard against a trivially invariant decoder that ignores its codes.
  _, params, apply = small
  a = jax.random.normal(jax.random.key(2), (1, 12, 32))
  b = a.at[:, 0].set(jax.random.normal(jax.random.key(3), (32,)))
  out_a = apply(params, a, method="decode")
  out_b = apply(params, b, method="decode")
  assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-4
