"""--mode=eval: every evaluator of config.eval.evaluators that applies, on the latest
checkpoint; the results go to TensorBoard and to <output_dir or workdir>/eval_<step>.json."""

import json

from etils import epath
import jax

from pivq_jax import experiment
from pivq_jax import visualize


def run(config, workdir: str, mesh) -> dict:
  exp, state = experiment.build(config, workdir, "eval", mesh)
  step = int(state.step)
  results = exp.evaluate(state, step)
  if jax.process_index() == 0:
    visualize.write_atomic(epath.Path(exp.output_dir) / f"eval_{step:08d}.json",
                           json.dumps(results, indent=2, sort_keys=True).encode())
  return results
