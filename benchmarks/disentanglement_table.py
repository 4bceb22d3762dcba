"""The README's faces disentanglement table: FactorQVAE, QVAE, PI-VQ (matching) and PI-VQ
(nearest), each trained with the shipped CPU configs and scored by `--mode=eval` (DCI and
InfoMEC on FactorQVAE's d codes and on PI-VQ's K code-presence bits).

  python benchmarks/disentanglement_table.py --root=/tmp/dis [--seeds=0,1] [--out=t.json]
      [--runs="PI-VQ (matching),PI-VQ (nearest)"]

Runs that reached their last step are not retrained (an interrupted one resumes), and
evals that already wrote their JSON are not repeated, so the table picks up where it stopped. On 2 CPU cores
each FactorQVAE / QVAE run takes ~6 min, each PI-VQ run ~10 min, and each eval 1-4 min.
"""

import json
import pathlib
import subprocess
import sys

from absl import app
from absl import flags
import numpy as np

_ROOT = flags.DEFINE_string("root", "/tmp/pivq_disentanglement", "Workdirs go here.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds (config.seed).")
_OUT = flags.DEFINE_string("out", None, "Optional JSON output path.")
_RUNS = flags.DEFINE_list("runs", None, "Rows to (re)compute, by name; default all of RUNS.")

# name -> (config, extra flags). QVAE's batch is FactorQVAE's half, as in the reference
# (256 vs 512): both VAE steps see 32 images.
RUNS = {
    "FactorQVAE": ("configs/factorqvae_faces.py", []),
    "QVAE": ("configs/factorqvae_faces.py",
             ["--config.factorqvae.variant=qvae", "--config.batch_size=32"]),
    "PI-VQ (matching)": ("configs/faces.py", []),
    "PI-VQ (nearest)": ("configs/faces.py", ["--config.quantizer.assignment=nearest"]),
}
# The same DCI sample for every model (the spec's is 10k / 5k); no FID samples.
EVAL_FLAGS = ["--mode=eval", "--config.eval.num_samples=0",
              "--config.eval.dci_train_examples=4000", "--config.eval.dci_test_examples=2000"]
COLUMNS = {"D": "eval/dci/disentanglement", "I (test)": "eval/dci/informativeness_test",
           "C": "eval/dci/completeness", "InfoM": "eval/infomec/infom",
           "InfoE": "eval/infomec/infoe", "InfoC": "eval/infomec/infoc"}


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _main(config, workdir, *flags_):
  cmd = [sys.executable, "-m", "pivq_jax.main", f"--config={config}", f"--workdir={workdir}",
         *flags_]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def run_one(name: str, seed: int) -> dict:
  config, extra = RUNS[name]
  workdir = pathlib.Path(_ROOT.value) / f"{_slug(name)}_s{seed}"
  seed_flag = f"--config.seed={seed}"
  final = lambda: json.loads((workdir / "config.json").read_text())["num_train_steps"]
  if not ((workdir / "config.json").exists() and
          (workdir / "checkpoints" / str(final())).is_dir()):
    _main(config, workdir, seed_flag, *extra)  # resumes an interrupted run
  result = workdir / f"eval_{final():08d}.json"
  if not result.exists():
    _main(config, workdir, seed_flag, *extra, *EVAL_FLAGS)
  results = json.loads(result.read_text())
  psnr = results.get("eval/psnr", results.get("eval/ema/psnr"))
  return dict({c: results[k] for c, k in COLUMNS.items()}, PSNR=psnr)


def main(_):
  names = _RUNS.value or list(RUNS)
  unknown = sorted(set(names) - set(RUNS))
  if unknown:
    raise app.UsageError(f"--runs names {unknown}, which are not rows; choose from {list(RUNS)}.")
  table = {name: [run_one(name, int(s)) for s in _SEEDS.value] for name in names}
  cols = [*COLUMNS, "PSNR"]
  print(f"\n| model ({len(_SEEDS.value)} seed(s)) | " + " | ".join(cols) + " |")
  print("|---" * (len(cols) + 1) + "|")
  for name, rows in table.items():
    cells = []
    for c in cols:
      v = np.array([r[c] for r in rows])
      fmt = ".1f" if c == "PSNR" else ".2f"
      cells.append(f"{v.mean():{fmt}}" + (f" ± {v.std():{fmt}}" if len(v) > 1 else ""))
    print(f"| {name} | " + " | ".join(cells) + " |")
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
  app.run(main)
