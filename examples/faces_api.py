"""Using a trained faces run from Python: encode, decode exported codes, mix two faces.

  python -m pivq_jax.main --config=configs/faces.py --workdir=workdir/faces
  python -m pivq_jax.main --config=configs/faces.py --workdir=workdir/faces \
      --mode=export --config.export.split=test
  python examples/faces_api.py --workdir=workdir/faces --out=/tmp/faces_api.png

Writes one PNG: held-out faces (row 1), their reconstructions (row 2), faces decoded from
the exported codes (row 3), and interpolation samples of rows 1 and 4 (rows 4 and 5).
"""

from absl import app
from absl import flags
from etils import epath
import numpy as np

import pivq_jax
from pivq_jax import export
from pivq_jax import visualize
from pivq_jax.data import faces

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained faces run.", required=True)
_EXPORT = flags.DEFINE_string("export_dir", None,
                              "Its export; default WORKDIR/export/test.")
_OUT = flags.DEFINE_string("out", "faces_api.png", "The PNG to write.")
_NUM = flags.DEFINE_integer("num", 8, "Faces per row.")


def main(argv):
  del argv
  run = pivq_jax.load(_WORKDIR.value)  # EMA params + config, nothing else
  n, r = _NUM.value, run.resolution
  test = faces.FacesSource(resolution=r, split="test")
  images = np.stack([test[i]["image"] for i in range(2 * n)])  # uint8 [2n, r, r, 3]

  codes = run.encode(images)  # int32 [2n, L]: each face as a set of L distinct codes
  print(f"step {run.step}: {len(codes)} faces -> code sets of {codes.shape[1]} codes "
        f"from a codebook of {run.num_codes}")
  recon = run.decode(codes[:n])

  export_dir = epath.Path(_EXPORT.value or epath.Path(_WORKDIR.value) / "export" / "test")
  exported, indices = export.load_codes(export_dir)  # int64 [N, L], dataset indices
  from_export = run.decode(exported[:n])
  assert np.array_equal(indices[:n], [test[i]["index"] for i in range(n)]), (
      "the export's first records are the split's first faces")

  mixed = run.sample(images[:n], images[n:])  # C = A ∩ B plus a draw from A △ B (§3.5)
  rows = [images[:n], visualize.to_uint8(recon), visualize.to_uint8(from_export),
          images[n:], visualize.to_uint8(mixed)]
  visualize.save_png(_OUT.value, visualize.grid(rows))
  print(f"Wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
