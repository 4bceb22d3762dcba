"""What both training loops do around their step: input, logging, evals, checkpoints and
preemption, on the schedule the config sets (log_every, eval_every, checkpoint_every)."""

import json

from absl import logging
from clu import periodic_actions
from etils import epath
import jax
import numpy as np

from pivq_jax import checkpoints
from pivq_jax import sharding as sharding_lib
from pivq_jax.data import pipeline


def train_batches(exp, start_step: int):
  """This host's batches from `start_step` on: a pure function of the step (exact resume).

  Images only: the train steps read nothing else (labels stay on the host), and
  --mode=plan compiles for the same batch, so a plan after a run reuses its step.
  """
  c, pcount = exp.config, jax.process_count()
  batches = pipeline.train_batches(
      exp.sources["train"], local_batch=c.batch_size // pcount, seed=c.seed,
      start_step=start_step, process_index=jax.process_index(), process_count=pcount,
      num_threads=c.data.num_threads)
  return ({"image": b["image"]} for b in batches)


class Diverged(FloatingPointError):
  """The loss, gradients or parameters became NaN or Inf at `step`; nothing after the last
  good checkpoint was saved."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


ROLLBACKS = "divergence.json"  # rollbacks so far and the batches they skip (exact resume)


class Loop:
  """`after_step` logs, evaluates, saves and honours preemption; `finish` waits for saves.

  Use it as a context manager: on every exit path, errors included, it waits for in-flight
  asynchronous saves, so a save is never cut off half-committed.
  """

  def __init__(self, exp, start_step: int):
    self.exp, self.config = exp, exp.config
    self.report = periodic_actions.ReportProgress(
        num_train_steps=self.config.num_train_steps, writer=exp.writer)
    self.pending, self.results = [], {}
    path = epath.Path(exp.workdir) / ROLLBACKS
    self.rollbacks = (json.loads(path.read_text()) if path.exists()
                      else {"retries": 0, "data_offset": 0})

  @property
  def data_offset(self) -> int:
    """Batches skipped by rollbacks: step s trains on stream batch s + data_offset."""
    return self.rollbacks["data_offset"]

  def recover(self, error: Diverged, state):
    """With divergence.retries left: back to the last good checkpoint, past the batches
    that led to the divergence -> (state, step). Otherwise re-raises `error`."""
    good = self.exp.mngr.latest_step()
    r = self.rollbacks
    if good is None or r["retries"] >= self.config.divergence.retries:
      raise error
    r["retries"] += 1
    r["data_offset"] += error.step - good
    if jax.process_index() == 0:
      path = epath.Path(self.exp.workdir) / ROLLBACKS
      path.with_name(ROLLBACKS + ".tmp").write_text(json.dumps(r))
      path.with_name(ROLLBACKS + ".tmp").replace(path)
    logging.warning("Diverged at step %d: rollback %d of %d to step %d, skipping %d "
                    "batches.", error.step, r["retries"], self.config.divergence.retries,
                    good, error.step - good)
    self.pending = []
    return checkpoints.restore_or_keep(self.exp.mngr, state, self.exp.shardings), good

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.exp.mngr.wait_until_finished()
    return False

  def after_step(self, step: int, state, metrics) -> bool:
    """Call once `step` updates are done; True when the loop must stop (preempted)."""
    c, exp = self.config, self.exp
    last = step == c.num_train_steps
    self.pending.append(metrics)
    self.report(step)
    log = step % c.log_every == 0 or last
    evaluate = step % c.eval_every == 0 or last
    preempted = exp.preemption.reached(exp.mngr, step)
    save = step % c.checkpoint_every == 0 or last or preempted
    if log or evaluate or save:
      # A failed async save stops the run here, at the next step that syncs anyway, with
      # its cause (orbax re-raises it), before more work is done on top of it.
      exp.mngr.check_for_errors()
      # Every step's on-device finite flag is read before its state is logged, evaluated or
      # saved: a diverged state is never checkpointed, and the steps between cost no sync.
      self._check_finite(step)
    if log:
      # One device->host transfer per log interval keeps the step loop asynchronous.
      stacked = sharding_lib.to_host(self.pending)
      # GAN metrics exist only from disc_start_step: average over the steps that have them.
      train_metrics = {f"train/{k}": float(np.mean([m[k] for m in stacked if k in m]))
                       for k in sorted(set().union(*stacked))}
      exp.writer.write_scalars(step, train_metrics)
      self.results.update(train_metrics)
      self.pending = []
    if evaluate:
      eval_metrics = exp.evaluate(state, step)
      self.results.update(eval_metrics)
      logging.info("step %d: %s", step, {k: round(v, 4) for k, v in eval_metrics.items()})
    if save:
      checkpoints.save(exp.mngr, step, state)
    if preempted:
      logging.warning("Preempted: saved step %d; run the same command again to resume.",
                      step)
    return preempted

  def _check_finite(self, step: int) -> None:
    flags = np.asarray(sharding_lib.to_host([m["finite"] for m in self.pending]))
    if flags.all():
      return
    bad = step - len(flags) + 1 + int(np.argmin(flags))
    self.exp.mngr.wait_until_finished()
    good = self.exp.mngr.latest_step()
    lr = ("factorqvae.learning_rate" if self.config.family == "factorqvae"
          else "optim.learning_rate")
    where = (f"the last good checkpoint is step {good} in {self.exp.mngr.directory}, and "
             "the same command with a lower --config." + lr + " resumes from it"
             if good is not None else
             "no checkpoint was saved yet; rerun with a lower --config." + lr)
    raise Diverged(f"Training diverged at step {bad} (the loss, gradients or parameters "
                   f"became NaN or Inf); {where}.", bad)

  def finish(self) -> dict:
    self.exp.mngr.wait_until_finished()
    self.exp.writer.flush()
    return self.results
