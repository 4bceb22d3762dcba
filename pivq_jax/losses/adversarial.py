"""UT's adversarial objective: hinge losses and the adaptive generator weight.

Paper §3.6 / supplemental §2 train PI-VQ with UT's PatchGAN objective (ut-reference.md):
  L_D = 0.5 * [mean relu(1 - D(real)) + mean relu(1 + D(fake))]
  L_G = -mean D(fake)
  total G loss = nll + w * L_G + quantizer loss, with nll = L1 + LPIPS and the adaptive
  w = clamp(||dnll/dW|| / (||dL_G/dW|| + 1e-4), 0, 1), stop-gradient (Esser et al. 2021),
  where W is the kernel (not the bias) of the decoder's final conv.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
  return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad, g_grad, *, eps: float = 1e-4):
  """||nll_grad|| / (||g_grad|| + eps), clamped to [0, 1] and never differentiated."""
  w = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + eps)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1.0))


def last_layer_grads(features, kernel, bias, cotangents, *, dtype=jnp.float32):
  """Gradients w.r.t. the final conv's kernel, one per output cotangent.

  The final conv is linear in its kernel, so d(loss)/dW needs only the conv's input
  `features` and d(loss)/d(x_hat): no second backward pass through the decoder, unlike
  UT's `autograd.grad(loss, last_layer)`. Matches `trunk.output_conv`.

  Args:
    features: float[B, H, W, C], the input of the decoder's final conv.
    kernel, bias: that conv's parameters.
    cotangents: sequence of float[B, H, W, 3], d(loss_i)/d(x_hat).
  """
  conv = nn.Conv(bias.shape[0], kernel.shape[:2], padding=1, dtype=dtype)
  apply = lambda k: conv.apply({"params": {"kernel": k, "bias": bias}}, features)
  out, vjp = jax.vjp(apply, kernel)
  return [vjp(c.astype(out.dtype))[0] for c in cotangents]
