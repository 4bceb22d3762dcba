"""Image grids for people to look at: PNG files in the workdir and TensorBoard images."""

import io
import os

from etils import epath
import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """float images in [0, 1] (clamped here, only for display) -> uint8."""
  return np.asarray(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0 + 0.5,
                    np.uint8)


def grid(rows: list, pad: int = 2) -> np.ndarray:
  """rows: list of uint8[N, H, W, 3] (same N, H, W) -> one uint8 image, one row each."""
  n, h, w, _ = rows[0].shape
  out = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
  for r, images in enumerate(rows):
    for i, img in enumerate(images):
      y, x = pad + r * (h + pad), pad + i * (w + pad)
      out[y:y + h, x:x + w] = img
  return out


def save_figure(path, fig) -> np.ndarray:
  """Renders a matplotlib figure, closes it, writes it as a PNG (unless `path` is None);
  returns the RGB image."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png")
  plt.close(fig)
  image = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
  if path is not None:
    save_png(path, image)
  return image


def save_png(path, image: np.ndarray) -> None:
  """Writes a PNG atomically, locally or on GCS via epath."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  write_atomic(path, buf.getvalue())


def save_array(path, array: np.ndarray) -> None:
  """np.save, atomically: the arrays other tools read (e.g. samples for FID)."""
  buf = io.BytesIO()
  np.save(buf, array)
  write_atomic(path, buf.getvalue())


def write_atomic(path, data: bytes) -> None:
  """Writes under a temporary name, then renames: never a half-written file that looks whole."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # hosts may share the directory
  tmp.write_bytes(data)
  tmp.replace(path)
