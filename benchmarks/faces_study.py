"""What limits learning on the faces default: held-out PSNR against step and CPU time.

  python benchmarks/faces_study.py --variants=screen        # the screening set
  python benchmarks/faces_study.py --variants=base,embed1 --steps=600
  python benchmarks/faces_study.py --step_costs             # time axis, then the plot
  python benchmarks/faces_study.py --plot_only              # redraw docs/faces_study.png
  python benchmarks/faces_study.py --runs=default,seed1,tq900,batch4,batch4_late,batch4_late_seed1,beta1,w8,no_reinit,gan_w0.3,tq1700,k1024,k1024_seed1,long,long_k1024,no_lpips,k2048

Each variant is `configs/faces.py` plus overrides, trained by the package's own trainer
(`runner.run(..., "train")`) in its own workdir, evaluated on the held-out split every
`--eval_every` steps (reconstruction evaluator only, EMA and raw params). The curve is read
back from the run's TensorBoard events. The time axis is step x the variant's step cost,
measured apart by `--step_costs` on an otherwise idle machine (best of 3 rounds, compiles
excluded), so it does not depend on what else ran during the study. One JSON line per
finished variant goes to --out; a rerun skips the variants already there and resumes an
interrupted one from its checkpoints.

`--runs` trains full schedules (every phase, the README's main command with overrides,
resumable) and plots their train and held-out curves against images seen to
docs/faces_runs.png; results in benchmarks/results/faces_runs.json.

`convae` is the reference outside PI-VQ: the same conv trunk with a spatial 8x8xC
bottleneck (C=32: as many floats as PI-VQ's 32x64 latents) and no transformers, trained
with the same loss and optimizer by a loop in this file. It is a benchmark only.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = flags.FLAGS
flags.DEFINE_string("variants", "screen", "Comma list of variant names, or a set name.")
flags.DEFINE_integer("steps", 0, "Train steps per variant (0: the variant's own).")
flags.DEFINE_integer("eval_every", 200, "Held-out eval interval in steps.")
flags.DEFINE_string("out", "benchmarks/results/faces_study.jsonl", "Results, one line each.")
flags.DEFINE_string("workroot", "/tmp/faces_study", "Parent of the variants' workdirs.")
flags.DEFINE_string("plot", "docs/faces_study.png", "Curves PNG ('' = none).")
flags.DEFINE_bool("plot_only", False, "Only redraw the plot from --out.")
flags.DEFINE_string("runs", "", "Comma list of full-schedule runs (RUNS) to train and plot.")
flags.DEFINE_bool("step_costs", False, "Measure the step cost of every finished variant "
                  "that lacks one (the plot's time axis), then redraw.")

# Unquantized screening: the schedule's quantizer and GAN start after the last step, so
# these measure the autoencoder alone (the ceiling the set bottleneck allows).
_UNQ = {"codebook_init.start_step": 10_000, "codebook_init.reinit_steps": (),
        "loss.disc_start_step": 10_000, "num_train_steps": 600}
# Rounds 4-6 screen at 400 steps (at batch 8), held-out eval every 100 (--eval_every=100).
_SHORT = dict(_UNQ, num_train_steps=400)

VARIANTS = {
    # name: overrides on configs/faces.py
    "base": dict(_UNQ),
    "lr1e-3": dict(_UNQ, **{"optim.learning_rate": 1e-3}),
    "lr1e-4": dict(_UNQ, **{"optim.learning_rate": 1e-4}),
    "embed1": dict(_UNQ, **{"model.embed_std": 1.0}),
    "lpips_off": dict(_UNQ, **{"loss.lpips_weight": 0.0}),
    "lpips_official_input": dict(_UNQ, **{"loss.lpips_ut_input": False}),
    "wide": dict(_UNQ, **{"model.nf": 32}),
    "grid16": dict(_UNQ, **{"model.ch_mult": (1, 2, 4)}),
    "tfm4": dict(_UNQ, **{"model.tfm_layers": 4}),
    "emb128": dict(_UNQ, **{"model.emb_dim": 128, "model.tfm_mlp_dim": 512}),
    "batch16": dict(_UNQ, **{"batch_size": 16}),
    "b2_0.99": dict(_UNQ, **{"optim.b2": 0.99}),
    "convae": dict(_UNQ),
    # Round 2: schedules and clipping (cosine ends at the variant's last step).
    "warmup_cosine": dict(_UNQ, **{"optim.warmup_steps": 100, "optim.decay": "cosine"}),
    "warmup_cosine_6e-4": dict(_UNQ, **{"optim.learning_rate": 6e-4,
                                        "optim.warmup_steps": 100, "optim.decay": "cosine"}),
    "clip1": dict(_UNQ, **{"optim.grad_clip_norm": 1.0}),
    "tfm1": dict(_UNQ, **{"model.tfm_layers": 1}),
    "latents64": dict(_UNQ, **{"model.num_latents": 64}),
    # Round 3: the encoder's positions at the scale of the features they are added to.
    "input_pos1": dict(_UNQ, **{"model.input_pos_std": 1.0}),
    "input_pos1_lpips_off": dict(_UNQ, **{"model.input_pos_std": 1.0,
                                          "loss.lpips_weight": 0.0}),
    # Round 4: is the pace the learning rate? The reference at 1e-3; PI-VQ at 1e-3 with
    # warm-up (1e-3 without it was the worst variant).
    "convae_lr1e-3": dict(_SHORT, **{"optim.learning_rate": 1e-3}),
    "warmup_lr1e-3": dict(_SHORT, **{"optim.learning_rate": 1e-3, "optim.warmup_steps": 200}),
    "warmup_lr1e-3_clip1": dict(_SHORT, **{"optim.learning_rate": 1e-3,
                                         "optim.warmup_steps": 200,
                                         "optim.grad_clip_norm": 1.0}),
    # Round 5: the decoder's output embeddings (its only positional input) at unit scale;
    # a second seed of the base, to size the seed noise.
    "output_pos1": dict(_SHORT, **{"model.output_pos_std": 1.0}),
    "positions1": dict(_SHORT, **{"model.input_pos_std": 1.0, "model.output_pos_std": 1.0}),
    "base_seed1": dict(_SHORT, **{"seed": 1}),
    # Round 9: the conv trunk at PyTorch's Conv2d init (UT's code), 1/sqrt(3) of Flax's
    # lecun-normal scale: the decoder starts with output std 0.58 instead of 1.12.
    "torch_init": dict(_UNQ, **{"model.trunk_init": "torch"}),
    # Round 11: a squared-error pixel term (PSNR's own measure) in place of L1, or beside
    # it. Weight 5: 2 * 5 * |e| matches L1's unit gradient per pixel at |e| = 0.1 (20 dB).
    "l2": dict(_UNQ, **{"loss.l1_weight": 0.0, "loss.l2_weight": 5.0}),
    "l1_plus_l2": dict(_UNQ, **{"loss.l2_weight": 5.0}),
    # Round 13: the model knobs the screen left out: trunk depth (2 res blocks per level),
    # attention heads (2 or 8 of the base's 4 at D = 64) and the MLP's width alone.
    "res2": dict(_UNQ, **{"model.res_blocks": 2}),
    "heads2": dict(_UNQ, **{"model.tfm_heads": 2}),
    "heads8": dict(_UNQ, **{"model.tfm_heads": 8}),
    "mlp128": dict(_UNQ, **{"model.tfm_mlp_dim": 128}),
    # Round 12: the ceilings at the README's budget. The default's 2,200 steps with no
    # quantizer and no GAN, for PI-VQ's network and for the conv reference.
    "base_2200": dict(_UNQ, num_train_steps=2200),
    "convae_2200": dict(_UNQ, num_train_steps=2200),
    # Round 6: GroupNorm(8) at the 16-channel levels normalises pairs of channels per
    # image, which leaves little room for an image's overall colour; and a smaller batch
    # at the same images seen (twice the steps).
    "groups1": dict(_SHORT, **{"model.norm_groups": 1}),
    "groups4": dict(_SHORT, **{"model.norm_groups": 4}),
    "batch4": dict(_UNQ, **{"batch_size": 4, "num_train_steps": 800}),
    "batch2": dict(_UNQ, **{"batch_size": 2, "num_train_steps": 1600}),
    # Round 8: cheaper trunks. Capacity is not the limit (round 1), so a narrower trunk at
    # the high-resolution levels may learn as fast per step at a fraction of the step's cost.
    "nf8": dict(_UNQ, **{"model.nf": 8, "model.ch_mult": (1, 2, 4, 8)}),
    "nf8_batch4": dict(_UNQ, **{"model.nf": 8, "model.ch_mult": (1, 2, 4, 8),
                                "batch_size": 4, "num_train_steps": 800}),
}
# Full schedules through the main command: name -> (config argument, overrides). The
# runs measured while faces.py had K = 256 codes and a W = 32-step history (until
# findings 20-21 made 1,024 and 128 the default) keep them: their names say what each
# changed against that default.
_K256 = ["--config.quantizer.num_codes=256", "--config.codebook_init.history_steps=32"]
RUNS = {
    "default": ("", _K256),
    # The schedule faces.py had before: T_q 900, re-init 1200, GAN from 1600.
    "tq900": ("", _K256 + ["--config.codebook_init.start_step=900",
                           "--config.codebook_init.reinit_steps=(1200,)",
                           "--config.loss.disc_start_step=1600"]),
    # Batch 4 on the T_q-900 schedule, every phase at the same images seen (x 3500/2200).
    "batch4": ("", _K256 + ["--config.batch_size=4", "--config.num_train_steps=3500",
                            "--config.codebook_init.start_step=1430",
                            "--config.codebook_init.history_steps=64",
                            "--config.codebook_init.reinit_steps=(1900,)",
                            "--config.loss.disc_start_step=2550", "--config.eval_every=1750"]),
    # Batch 4 on the default schedule (T_q 1,400, re-init 1,650, GAN from 1,900), every
    # phase at the same images seen (x 3500/2200).
    "batch4_late": ("", _K256 + ["--config.batch_size=4", "--config.num_train_steps=3500",
                                 "--config.codebook_init.start_step=2227",
                                 "--config.codebook_init.history_steps=64",
                                 "--config.codebook_init.reinit_steps=(2625,)",
                                 "--config.loss.disc_start_step=3023", "--config.eval_every=1750"]),
    "long": ("long", _K256),
    # The default with one knob changed: a second seed (the noise of a full run), then the
    # parts of the quantizer schedule not swept above: beta, the k-means history W, the
    # re-init, the GAN's weight.
    "seed1": ("", _K256 + ["--config.seed=1"]),
    "beta1": ("", _K256 + ["--config.quantizer.beta=1.0"]),
    "w8": ("", _K256 + ["--config.codebook_init.history_steps=8"]),
    "no_reinit": ("", _K256 + ["--config.codebook_init.reinit_steps=()"]),
    "gan_w0.3": ("", _K256 + ["--config.loss.adversarial_weight=0.3"]),
    # Quantizing later still (the one lever past the noise, finding 11): T_q 1,700,
    # re-init 1,900, GAN from 2,000.
    # A second seed of batch4_late (finding 13: +0.34 dB on one seed).
    "batch4_late_seed1": ("", _K256 + ["--config.seed=1", "--config.batch_size=4",
                                       "--config.num_train_steps=3500",
                                       "--config.codebook_init.start_step=2227",
                                       "--config.codebook_init.history_steps=64",
                                       "--config.codebook_init.reinit_steps=(2625,)",
                                       "--config.loss.disc_start_step=3023",
                                       "--config.eval_every=1750"]),
    # The default with a 4x codebook and k-means history (32 latents per code, as K = 256
    # with W = 32): does a finer codebook cut what quantizing costs?
    "k1024": ("", ["--config.quantizer.num_codes=1024",
                   "--config.codebook_init.history_steps=128"]),
    "k1024_seed1": ("", ["--config.seed=1", "--config.quantizer.num_codes=1024",
                         "--config.codebook_init.history_steps=128"]),
    # `:long` with a 4x codebook (quantizing its 24.7 dB autoencoder with K = 256 cost ~4.5
    # dB of train PSNR at once) and a 4x k-means history (the same 32 latents per code).
    "long_k1024": ("long", ["--config.quantizer.num_codes=1024",
                            "--config.codebook_init.history_steps=128"]),
    # Today's default (K = 1,024) without the LPIPS term, the GAN phase kept: on the T_q 900
    # schedule L1 alone was 0.8 dB ahead with a better LPIPS-VGG too (docs/results.md).
    "no_lpips": ("", ["--config.loss.lpips_weight=0.0"]),
    # Does a larger codebook keep paying? K = 2,048 with W = 256 (32 latents per code).
    "k2048": ("", ["--config.quantizer.num_codes=2048",
                   "--config.codebook_init.history_steps=256"]),
    "tq1700": ("", _K256 + ["--config.codebook_init.start_step=1700",
                            "--config.codebook_init.reinit_steps=(1900,)",
                            "--config.loss.disc_start_step=2000"]),
}
SETS = {
    "round13": ["res2", "heads2", "heads8", "mlp128"],
    "round12": ["convae_2200", "base_2200"],
    "round11": ["l2", "l1_plus_l2"],
    "round9": ["torch_init"],
    "round8": ["nf8", "nf8_batch4"],
    "round6": ["groups1", "groups4", "batch4", "batch2"],
    "round5": ["output_pos1", "positions1", "base_seed1"],
    "round4": ["convae_lr1e-3", "warmup_lr1e-3", "warmup_lr1e-3_clip1"],
    "round3": ["input_pos1", "input_pos1_lpips_off"],
    "round2": ["warmup_cosine", "warmup_cosine_6e-4", "clip1", "tfm1", "latents64"],
    "screen": ["base", "convae", "embed1", "lr1e-3", "lpips_official_input", "lpips_off",
               "grid16", "tfm4", "emb128", "wide", "batch16", "b2_0.99", "lr1e-4"],
}


def _config(name: str):
  from configs import faces  # pylint: disable=g-import-not-at-top
  c = faces.get_config()
  c.eval.evaluators = ("reconstruction",)
  c.eval.lpips_net = ""
  c.eval.num_examples = 256
  c.eval_every = FLAGS.eval_every
  c.checkpoint_every = FLAGS.eval_every
  c.keep_checkpoints = 1
  for key, value in VARIANTS[name].items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  if FLAGS.steps:
    c.num_train_steps = FLAGS.steps
  return c


def _events(workdir: str):
  """(tag, step, value, wall time) of every scalar in a run's TB events, after one
  (None, step, None, wall time) per event, so callers can see when the run started."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for fname in sorted(tf.io.gfile.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(fname):
      yield None, event.step, None, event.wall_time
      for v in event.summary.value:
        if not v.tensor.tensor_shape.dim:  # scalars only (not images or histograms)
          yield v.tag, event.step, float(tf.make_ndarray(v.tensor)), event.wall_time


def _curve(workdir: str) -> list[dict]:
  """(step, seconds since the first event, eval scalars) from the run's TB events."""
  points, t0 = {}, None
  for tag, step, value, wall in _events(workdir):
    t0 = wall if t0 is None else min(t0, wall)
    if tag and tag.startswith("eval/") and tag.endswith("psnr"):
      p = points.setdefault(step, {"step": step})
      p[tag], p["seconds"] = value, wall
  out = sorted(points.values(), key=lambda p: p["step"])
  for p in out:
    p["seconds"] = round(p["seconds"] - t0, 1)
  return out


def _run_pivq(name: str, workdir: str) -> list[dict]:
  from pivq_jax import runner  # pylint: disable=g-import-not-at-top
  runner.run(_config(name), workdir, "train")
  return _curve(workdir)


def _convae(c):
  """The spatial-bottleneck reference: same trunk, same loss (l1 + LPIPS), same optimizer.
  -> (model, init params, step(params, opt, ema, batch, lpips) -> (params, opt, ema), tx)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import optax
  from pivq_jax.data import pipeline
  from pivq_jax.losses import lpips
  from pivq_jax.models import trunk
  import flax.linen as nn

  m = c.model
  kw = dict(nf=m.nf, ch_mult=tuple(m.ch_mult), res_blocks=m.res_blocks,
            attn_resolutions=tuple(m.attn_resolutions), norm_groups=m.norm_groups)
  bottleneck = m.num_latents * m.emb_dim // (c.data.resolution // 8) ** 2

  class ConvAE(nn.Module):
    @nn.compact
    def __call__(self, x):
      return trunk.Decoder(**kw)(trunk.Encoder(out_ch=bottleneck, **kw)(x))

  model = ConvAE()
  params = model.init(jax.random.key(c.seed), jnp.zeros((1, 64, 64, 3)))["params"]
  tx = optax.adam(c.optim.learning_rate, b1=c.optim.b1, b2=c.optim.b2)

  @jax.jit  # LPIPS weights as an argument: as closed-over constants XLA folds them slowly
  def step(params, opt, ema, batch, lp):
    x = pipeline.images(batch)

    def loss_fn(p):
      x_hat = model.apply({"params": p}, x)
      dist = lpips.lpips_distance(lp, x_hat, x, net=c.loss.lpips_net,
                                  ut_unscaled_input=c.loss.lpips_ut_input)
      return jnp.mean(jnp.abs(x - x_hat)) + c.loss.lpips_weight * jnp.mean(dist)

    grads = jax.grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: c.ema.decay * e + (1 - c.ema.decay) * p, ema, params)
    return params, opt, ema

  return model, params, step, tx


def _run_convae(name: str, workdir: str) -> list[dict]:
  del workdir
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from pivq_jax.data import pipeline
  from pivq_jax.evaluators import common
  from pivq_jax.losses import lpips

  c = _config(name)
  model, params, step, tx = _convae(c)
  train = pipeline.make_source(c.data, "train")
  test = pipeline.make_source(c.data, "test")
  eval_data = list(pipeline.eval_batches(test, num_examples=c.eval.num_examples,
                                         batch_size=c.eval.batch_size))
  lp = lpips.load_lpips_params(c.loss.lpips_net)
  opt, ema = tx.init(params), params

  @jax.jit
  def eval_psnr(params, batch):
    x = pipeline.images(batch)
    return common.psnr(x, model.apply({"params": params}, x))

  batches = pipeline.train_batches(train, local_batch=c.batch_size, seed=c.seed)
  t0, curve = time.time(), []
  for i in range(1, c.num_train_steps + 1):
    params, opt, ema = step(params, opt, ema, next(batches), lp)
    if i % c.eval_every == 0 or i == c.num_train_steps:
      point = {"step": i}
      for tag, p in (("ema", ema), ("raw", params)):
        point[f"eval/{tag}/psnr"] = float(np.mean(np.concatenate(
            [np.asarray(eval_psnr(p, b)) for b in eval_data])))
      point["seconds"] = round(time.time() - t0, 1)
      curve.append(point)
      print(name, point, flush=True)
  return curve


def step_cost(name: str, steps: int = 5, rounds: int = 3) -> float:
  """Seconds per train step of a variant on this machine (best round; compile excluded):
  the time axis of the plot, independent of whatever else ran during the study."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from pivq_jax import config_checks
  from pivq_jax import experiment
  from pivq_jax import train_state
  from pivq_jax.losses import lpips
  from pivq_jax.modes import train_pivq
  c = _config(name)
  lp = jax.device_put(lpips.load_lpips_params(c.loss.lpips_net))
  batch = {"image": np.random.default_rng(0).integers(
      0, 255, (c.batch_size, c.data.resolution, c.data.resolution, 3), np.uint8)}
  if name.startswith("convae"):
    _, params, fn, tx = _convae(c)
    carry = (params, tx.init(params), params)
    run = lambda carry: fn(*carry, batch, lp)
  else:
    config_checks.check_config(c, num_devices=jax.device_count())
    mesh = experiment.make_mesh(c)
    modules = train_state.build_modules(c)
    carry, shardings = train_state.create_train_state(c, modules, mesh)
    fn = train_pivq.jit_train_step(c, modules, shardings, mesh, quantize=False,
                                   adversarial_on=False)
    run = lambda state: fn(state, batch, lp)[0]
  carry = jax.block_until_ready(run(carry))
  best = float("inf")
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(steps):
      carry = run(carry)
    jax.block_until_ready(carry)
    best = min(best, (time.perf_counter() - t) / steps)
  return best


def _costs_path(out: str) -> str:
  return out.replace(".jsonl", "_step_costs.json")


def _done(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {r["name"]: r for r in map(json.loads, f)}


def plot(path: str, png: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  results = _done(path)
  costs = json.load(open(_costs_path(path))) if os.path.exists(_costs_path(path)) else {}
  fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
  colors = plt.get_cmap("tab20").colors
  for i, (name, r) in enumerate(results.items()):
    batch = r["overrides"].get("batch_size", 8)  # images seen: batches differ (4 to 16)
    images = [p["step"] * batch for p in r["curve"]]
    secs = [p["step"] * costs.get(name, float("nan")) for p in r["curve"]]
    psnr = [p["eval/ema/psnr"] for p in r["curve"]]
    kw = dict(label=name, color=colors[i % len(colors)], lw=1.2, ls="-" if i < 20 else ":")
    # The base and the conv reference in black; their 2,200-step runs (the same first 600
    # steps, bit for bit) extend them to the README's budget.
    if name in ("base", "base_2200"):
      kw.update(color="black", lw=2.5, ls="-")
    elif name in ("convae", "convae_2200"):
      kw.update(color="black", lw=2.5, ls="--")
    axes[0].plot(images, psnr, marker="o", ms=3, **kw)
    axes[1].plot(secs, psnr, marker="o", ms=3, **kw)
  axes[0].set_xlabel("training images seen (step x batch)")
  axes[1].set_xlabel("train seconds on 2 CPU cores (step x measured step cost)")
  for ax in axes:
    ax.set_ylabel("held-out EMA PSNR (dB)")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=2)
  fig.tight_layout()
  fig.savefig(png, dpi=110)


def _run_curves(workdir: str) -> dict:
  """Train PSNR and held-out EMA PSNR / LPIPS by step (a resumed run's repeats: the last)."""
  out = {t: {} for t in ("train/psnr", "eval/ema/psnr", "eval/ema/lpips")}
  for tag, step, value, _ in _events(workdir):
    if tag in out:
      out[tag][step] = round(value, 4)
  return {t: sorted(c.items()) for t, c in out.items()}


def _finished(workdir: str) -> bool:
  """Trained to its last step and evaluated there (a rerun would only re-evaluate)."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return False
  last = json.load(open(os.path.join(workdir, "config.json")))["num_train_steps"]
  return any(step == last for step, _ in _run_curves(workdir)["eval/ema/psnr"])


def full_runs(names: list[str], path: str, png: str) -> None:
  import subprocess  # pylint: disable=g-import-not-at-top
  results = json.load(open(path)) if os.path.exists(path) else {}
  for name in names:
    arg, overrides = RUNS[name]
    workdir = os.path.join(FLAGS.workroot, "runs", name)
    config = "configs/faces.py" + (f":{arg}" if arg else "")
    cmd = [sys.executable, "-m", "pivq_jax.main", f"--config={config}",
           f"--workdir={workdir}", *overrides]
    if name not in results:
      if not _finished(workdir):  # the main command resumes an interrupted run
        subprocess.run(cmd, check=True)
      batch = json.load(open(os.path.join(workdir, "config.json")))["batch_size"]
      results[name] = {"command": " ".join(cmd[1:]), "batch_size": batch,
                       **_run_curves(workdir)}
      with open(path, "w") as f:
        json.dump(results, f, indent=1)
      _plot_runs(results, png)  # after each run: an interrupted study still shows its curves
  _plot_runs(results, png)


# One panel per question, each against the K = 256 default's two seeds (grey); a run in
# no panel lands in the last one.
PANELS = {
    "when to quantize": ["tq900", "tq1700"],
    "batch 4 (same images seen)": ["batch4", "batch4_late", "batch4_late_seed1"],
    "the quantizer's settings": ["beta1", "w8", "no_reinit", "gan_w0.3"],
    "codebook size (1,024: today's default)": ["k1024", "k1024_seed1", "k2048"],
    ":long (9,000 steps)": ["long", "long_k1024"],
    "the objective (K = 1,024)": ["k1024", "no_lpips"],
}
_REFERENCE = ("default", "seed1")


def _plot_runs(results: dict, png: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  panels = {title: [n for n in names if n in results] for title, names in PANELS.items()}
  placed = {n for names in panels.values() for n in names} | set(_REFERENCE)
  if [n for n in results if n not in placed]:
    panels["other runs"] = [n for n in results if n not in placed]
  cols = 3
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), sharey=True,
                           squeeze=False)

  def curve(ax, name, color, lw, label=None):
    r = results[name]
    batch = r["batch_size"]
    steps, psnr = np.asarray(r["train/psnr"]).T
    k = 5  # train PSNR is per batch: a running mean over 5 logs
    smooth = np.convolve(psnr, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:] * batch, smooth, color=color, lw=0.8, alpha=0.5)
    ev_steps, ev = np.asarray(r["eval/ema/psnr"]).T
    ax.plot(ev_steps * batch, ev, "o-", color=color, lw=lw,
            label=f"{label or name}: {ev[-1]:.2f}")

  for ax, (title, names) in zip(axes.flat, panels.items()):
    for name, grey in zip(_REFERENCE, ("0.35", "0.6")):
      if name in results:
        curve(ax, name, grey, 1.5, label=f"{name} (K = 256)")
    for i, name in enumerate(names):
      curve(ax, name, plt.get_cmap("tab10").colors[i], 2)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="held-out EMA PSNR at the end", title_fontsize=8)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  for ax in axes[-1]:
    ax.set_xlabel("training images seen (step x batch)")
  for ax in axes[:, 0]:
    ax.set_ylabel("PSNR (dB): held out (dots), train (thin)")
  fig.tight_layout()
  fig.savefig(png, dpi=100)


def main(argv):
  del argv
  if FLAGS.runs:
    unknown = [n for n in FLAGS.runs.split(",") if n not in RUNS]
    if unknown:
      raise app.UsageError(f"Unknown runs {unknown}; known: {sorted(RUNS)}.")
    return full_runs(FLAGS.runs.split(","), "benchmarks/results/faces_runs.json",
                     "docs/faces_runs.png")
  if FLAGS.step_costs:
    path = _costs_path(FLAGS.out)
    costs = json.load(open(path)) if os.path.exists(path) else {}
    for name in _done(FLAGS.out):
      if name not in costs:
        costs[name] = round(step_cost(name), 4)
        print(name, costs[name], flush=True)
        with open(path, "w") as f:
          json.dump(costs, f, indent=1, sort_keys=True)
  if FLAGS.plot_only or FLAGS.step_costs:
    return plot(FLAGS.out, FLAGS.plot)
  names = SETS.get(FLAGS.variants, None) or FLAGS.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise app.UsageError(f"Unknown variants {unknown}; known: {sorted(VARIANTS)}.")
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  for name in names:
    if name in _done(FLAGS.out):
      continue
    workdir = os.path.join(FLAGS.workroot, name)
    run = _run_convae if name.startswith("convae") else _run_pivq
    curve = run(name, workdir)
    record = {"name": name, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                          for k, v in VARIANTS[name].items()},
              "steps": FLAGS.steps or VARIANTS[name].get("num_train_steps"),
              "final_ema_psnr": curve[-1]["eval/ema/psnr"], "curve": curve}
    with open(FLAGS.out, "a") as f:
      f.write(json.dumps(record) + "\n")
    print(name, record["final_ema_psnr"], flush=True)
    if FLAGS.plot:
      plot(FLAGS.out, FLAGS.plot)


if __name__ == "__main__":
  app.run(main)
