"""What both training loops do around their step: input, logging, evals, checkpoints and
preemption, on the schedule the config sets (log_every, eval_every, checkpoint_every)."""

from absl import logging
from clu import periodic_actions
import jax
import numpy as np

from pivq_jax import checkpoints
from pivq_jax import sharding as sharding_lib
from pivq_jax.data import pipeline


def train_batches(exp, start_step: int):
  """This host's batches from `start_step` on: a pure function of the step (exact resume)."""
  c, pcount = exp.config, jax.process_count()
  return pipeline.train_batches(
      exp.sources["train"], local_batch=c.batch_size // pcount, seed=c.seed,
      start_step=start_step, process_index=jax.process_index(), process_count=pcount,
      num_threads=c.data.num_threads)


class Loop:
  """`after_step` logs, evaluates, saves and honours preemption; `finish` waits for saves."""

  def __init__(self, exp, start_step: int):
    self.exp, self.config = exp, exp.config
    self.report = periodic_actions.ReportProgress(
        num_train_steps=self.config.num_train_steps, writer=exp.writer)
    self.pending, self.results = [], {}

  def after_step(self, step: int, state, metrics) -> bool:
    """Call once `step` updates are done; True when the loop must stop (preempted)."""
    c, exp = self.config, self.exp
    last = step == c.num_train_steps
    self.pending.append(metrics)
    self.report(step)
    if step % c.log_every == 0 or last:
      # One device->host transfer per log interval keeps the step loop asynchronous.
      stacked = sharding_lib.to_host(self.pending)
      # GAN metrics exist only from disc_start_step: average over the steps that have them.
      train_metrics = {f"train/{k}": float(np.mean([m[k] for m in stacked if k in m]))
                       for k in sorted(set().union(*stacked))}
      exp.writer.write_scalars(step, train_metrics)
      self.results.update(train_metrics)
      self.pending = []
      if not np.isfinite(stacked[-1]["loss"]):
        lr = "factorqvae.learning_rate" if c.family == "factorqvae" else "optim.learning_rate"
        raise FloatingPointError(f"Training loss became {stacked[-1]['loss']} at step "
                                 f"{step}; lower --config.{lr}.")
    if step % c.eval_every == 0 or last:
      eval_metrics = exp.evaluate(state, step)
      self.results.update(eval_metrics)
      logging.info("step %d: %s", step, {k: round(v, 4) for k, v in eval_metrics.items()})
    preempted = exp.preemption.reached(exp.mngr, step)
    if step % c.checkpoint_every == 0 or last or preempted:
      checkpoints.save(exp.mngr, step, state)
    if preempted:
      logging.warning("Preempted: saved step %d; run the same command again to resume.",
                      step)
    return preempted

  def finish(self) -> dict:
    self.exp.mngr.wait_until_finished()
    self.exp.writer.flush()
    return self.results
