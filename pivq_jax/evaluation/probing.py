"""Linear probes of the learned code sets (paper §3.8, Fig. 5).

Each image is described by K binary features, one per codebook entry: is code k in the
image's code set? For each ground-truth attribute a logistic regression is fit on those
features and its 5-fold cross-validated accuracy is set beside the majority-class predictor
(e.g. always "not bald"). The paper probes 15 binary FFHQ attributes; here the labels are
CelebA's 40 binary attributes or the procedural faces' categorical factors
(`pivq_jax.data.faces.FACTOR_NAMES`, 2 to 8 classes), which get a multinomial regression.

Cost: the features go to scikit-learn as a float32 CSR matrix, so one L-BFGS iteration is
O(nnz * classes) with nnz <= N * L (N images, L codes each), whatever K is, and memory is
O(nnz) (a dense float64 copy of [50k, 4096] would be 1.6 GB). Measured on 2 CPU cores with
N = 50k, K = 4096, 5 folds: ~1.3 s per attribute when images use ~49 distinct codes
(nearest assignment), ~25 s when they use 512 (matching), every fit converging well
within max_iter; CelebA's 40 attributes at L = 512 are ~15 min. `n_jobs` spreads the
(attribute, fold) fits over processes.
"""

from collections.abc import Mapping, Sequence
import warnings

import joblib
import matplotlib
import numpy as np
from scipy import sparse
from sklearn import exceptions as sklearn_exceptions
from sklearn import linear_model
from sklearn import model_selection

from pivq_jax import visualize

matplotlib.use("Agg")  # headless: TPU VMs and CI have no display


def presence_features(codes, num_codes: int, *, as_sparse: bool = False):
  """Code-presence features (paper §3.8): feature k of image n is 1 iff code k is among
  image n's L codes; repeats count once, positions do not matter.

  codes: int[N, L] in [0, num_codes). Returns bool[N, num_codes], or with `as_sparse` a
  scipy CSR matrix of the same values (float32; memory O(N * L) rather than O(N * K)).
  """
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"codes must be [N, L], got shape {codes.shape}")
  if codes.size and (codes.min() < 0 or codes.max() >= num_codes):
    raise ValueError(f"codes must lie in [0, {num_codes}), got [{codes.min()}, "
                     f"{codes.max()}]")
  n, length = codes.shape
  if as_sparse:
    rows = np.repeat(np.arange(n), length)
    matrix = sparse.csr_matrix((np.ones(n * length, np.float32), (rows, codes.ravel())),
                               shape=(n, num_codes))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # duplicates were summed: presence, not counts
    return matrix
  present = np.zeros((n, num_codes), bool)
  present[np.arange(n)[:, None], codes] = True
  return present


def _design_matrix(features):
  """float32 CSR, built straight from the 0/1 pattern: never a dense float copy (a bool
  [50k, 4096] is 200 MB, the same as float64 1.6 GB)."""
  if sparse.issparse(features):
    return sparse.csr_matrix(features, dtype=np.float32)
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, K], got shape {features.shape}")
  return sparse.csr_matrix(features != 0, dtype=np.float32)


def _fit_fold(x, y, train, test, c, max_iter):
  """One fold: (probe accuracy, majority-class accuracy, converged) on the test part."""
  y_train, y_test = y[train], y[test]
  # The baseline sees only the training fold, like the probe.
  majority = np.bincount(y_train).argmax()
  majority_accuracy = float(np.mean(y_test == majority))
  if np.unique(y_train).size < 2:  # possible with the unstratified fallback
    return majority_accuracy, majority_accuracy, True
  model = linear_model.LogisticRegression(C=c, max_iter=max_iter)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sklearn_exceptions.ConvergenceWarning)
    model.fit(x[train], y_train)
  accuracy = float(model.score(x[test], y_test))
  return accuracy, majority_accuracy, bool(np.all(model.n_iter_ < max_iter))


def probe(features, labels, names: Sequence[str], *, folds: int = 5, seed: int = 0,
          c: float = 1.0, max_iter: int = 1000, n_jobs: int = 1) -> dict[str, dict]:
  """Per-attribute logistic-regression probes, scored by `folds`-fold cross-validation
  (paper §3.8 / §4, Fig. 5).

  features: [N, K] code presence (`presence_features`), dense or scipy sparse.
  labels: int[N, A] (or int[N] when A = 1), any integer coding per column.
  names: the A attribute names.
  c: inverse L2 strength (scikit-learn's C); the paper fixes neither it nor `max_iter`,
    so the default is scikit-learn's C = 1 with a higher iteration cap.
  n_jobs: joblib processes over the (attribute, fold) fits.

  The paper's attributes are binary (binary logistic regression); a column with more than
  two classes gets one multinomial (softmax) regression, scikit-learn's L-BFGS default.
  Folds are shuffled (`seed`) and stratified by the column's classes; when a class has
  fewer than `folds` members, plain shuffled KFold is used instead (`stratified` False).
  The majority baseline predicts each training fold's most frequent class.

  Returns {name: {"accuracy", "accuracy_std", "majority", "majority_std" (means and
  standard deviations over the folds), "num_classes", "num_examples", "stratified",
  "converged" (every fold's L-BFGS stopped before max_iter)}}. A constant column is not
  fitted: its entry has accuracy NaN, majority 1 and "skipped" giving the reason.
  """
  labels = np.asarray(labels)
  if labels.ndim == 1:
    labels = labels[:, None]
  if labels.ndim != 2 or labels.shape[1] != len(names):
    raise ValueError(f"labels {labels.shape} do not match {len(names)} names")
  x = _design_matrix(features)
  if x.shape[0] != labels.shape[0]:
    raise ValueError(f"{x.shape[0]} feature rows but {labels.shape[0]} label rows")

  results, tasks, owners = {}, [], []
  for a, name in enumerate(names):
    classes, y, counts = np.unique(labels[:, a], return_inverse=True, return_counts=True)
    entry = {"num_classes": len(classes), "num_examples": len(y)}
    if len(classes) < 2:
      results[name] = {"accuracy": float("nan"), "accuracy_std": float("nan"),
                       "majority": 1.0, "majority_std": 0.0, **entry,
                       "stratified": False, "converged": True,
                       "skipped": f"constant label {classes[0] if len(classes) else None}"}
      continue
    stratified = bool(counts.min() >= folds)
    split = (model_selection.StratifiedKFold if stratified else model_selection.KFold)(
        n_splits=folds, shuffle=True, random_state=seed)
    results[name] = {**entry, "stratified": stratified}
    for train, test in split.split(np.zeros(len(y)), y):
      tasks.append(joblib.delayed(_fit_fold)(x, y, train, test, c, max_iter))
      owners.append(name)

  per_fold = joblib.Parallel(n_jobs=n_jobs)(tasks)
  for name in dict.fromkeys(owners):
    accuracy, majority, converged = map(
        np.asarray, zip(*[r for o, r in zip(owners, per_fold) if o == name]))
    results[name] = {"accuracy": float(accuracy.mean()), "accuracy_std": float(accuracy.std()),
                     "majority": float(majority.mean()), "majority_std": float(majority.std()),
                     **results[name], "converged": bool(converged.all())}
  return {name: results[name] for name in names}


def plot_probing(path, results: Mapping[str, Mapping], *,
                 title: str = "Logistic-regression probes on code presence",
                 top: int | None = None):
  """A PNG like the paper's Fig. 5: per attribute, cross-validated probe accuracy (with
  its fold standard deviation) beside the majority-class baseline.

  results: `probe`'s output; skipped (constant) attributes are left out and counted in the
  title. top: keep only the `top` most "predictable" attributes, which we take to mean the
  largest accuracy - majority (the paper shows its top 15 without defining the ranking),
  ordered best first; None keeps all, in the given order.
  Returns the image as uint8[H, W, 3] (for TensorBoard).
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (slow import)

  shown = [(n, r) for n, r in results.items() if "skipped" not in r]
  skipped = len(results) - len(shown)
  if top is not None:
    shown = sorted(shown, key=lambda nr: nr[1]["majority"] - nr[1]["accuracy"])[:top]
  names = [n for n, _ in shown]
  xs = np.arange(len(shown))
  width = 0.4
  fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(shown) + 2.0), 4.5), dpi=100)
  ax.bar(xs - width / 2, [r["accuracy"] for _, r in shown], width,
         yerr=[r["accuracy_std"] for _, r in shown], capsize=2,
         label="logistic regression (CV)")
  ax.bar(xs + width / 2, [r["majority"] for _, r in shown], width,
         label="majority class")
  ax.set_xticks(xs)
  ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
  ax.set_xlim(-0.75, max(len(shown), 1) - 0.25)
  ax.set_ylim(0.0, 1.0)
  ax.set_ylabel("accuracy")
  if not shown:
    ax.text(0.5, 0.5, "no attribute to show", ha="center", transform=ax.transAxes)
  ax.set_title(title + (f" ({skipped} constant skipped)" if skipped else ""))
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # clear of the bars
  return visualize.save_figure(path, fig)
