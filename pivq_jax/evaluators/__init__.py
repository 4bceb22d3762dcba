"""Evaluators: one file each, with the same small interface (big_vision's habit).

`config.eval.evaluators` lists them by file name. Each file defines `Evaluator` with
  - `modes`: the modes it runs in: "train" (every eval_every steps) and/or "eval"
    (`--mode=eval`);
  - `enabled(config, step)`, a classmethod: whether it applies to this config at this
    checkpoint step (step is None when asked before training);
  - `__init__(exp)`: prepares from the `experiment.Experiment` (loads weights, checks
    files) before anything compiles;
  - `run(state, step) -> dict`: its scalars, keyed "eval/...". Pictures go through
    `exp.write_image`.
Adding one is a new file here plus its name in `config.eval.evaluators`.
"""
