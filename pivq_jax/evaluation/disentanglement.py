"""Disentanglement metrics: DCI and InfoMEC (FactorQVAE paper §3.3, spec `factorqvae.md`).

The paper's equations are unnumbered; each formula below is cited by section and symbol.

DCI (§3.3.1, Eastwood & Williams 2018 as in disentanglement_lib): one gradient-boosted tree
classifier per factor s_j on the latents z; importance M_ij = |feature importance of z_i for
s_j|. D weights each latent's 1 - H_F(P_i·) by its share ρ_i of the importance, C weights each
factor's 1 - H_d(P̃_·j) by ρ_j, I is the mean classification accuracy (train and test).

InfoMEC (§3.3.2, Hsu et al. 2023): NMI_ij = I(z_i; s_j) / H(s_j) over the active latents;
InfoM (modularity) and InfoC (compactness) are the rescaled mean max/sum ratios of its rows
and columns; InfoE (explicitness) is predictive V-information of a multinomial logistic
regression, normalised by the null model's.

Latents are either d scalar codes per image (FactorQVAE: int code indices, or continuous
means for the VAE baselines) or PI-VQ's K binary code-presence features
(`probing.presence_features`, bool or scipy sparse). Bool, sparse or mostly-zero (<= 10%
non-zero) latents go to scikit-learn as sparse matrices, and latents constant on the data
are pruned before any model is fit (they can take no split, carry no information, and keep
a zero importance row / NMI row in the outputs).

Cost, measured on 2 CPU cores shared with another job (so upper bounds), n_jobs=1, 10k train
/ 5k test points, the faces dataset's 9 factors (sizes 6,6,4,4,3,2,3,8,3: 38 trees a
boosting stage, 3,800 trees in all), K = 4096 presence features all active:
- dci, ~64 distinct codes per image: 158 s (~40 ms a tree); max_samples=2000: 45 s (less
  than linear: the splitter's per-feature work at each node stays). ~480 codes per image:
  max_samples=2000 180 s, 5000 (n_jobs=2) 334 s, all 10k ~10 min (estimated). The same
  features as a dense float matrix are ~100x slower (the dense splitter sorts every feature
  at every node), hence the sparse path. n_jobs=2 gained nothing while the cores were shared.
- infomec: 12 s (64 codes per image) / 19 s (480); the NMI matrix is 0.3-0.5 s of that, the
  rest InfoE's regressions. N = 50k, 64 codes: 22 s.
- FactorQVAE-sized latents (d = 12 code indices, Shapes3D's factors: 57 trees a stage):
  dci 90 s, infomec 1.2 s; continuous d = 6 (k-NN estimator): infomec 16 s.

Reading the scores of K presence bits: InfoM averages every active bit equally, so rare,
uninformative codes (max/sum ~ 1/F) pull it down, and C (base log d = log K) and InfoC (sum
over, and 1/L for, up to K latents) differ in scale from the d-scalar-code case; compare
such numbers between code-set models, not with the paper's Table 1.
"""

from collections.abc import Iterator
import warnings

import joblib
import numpy as np
from scipy import sparse
from sklearn import ensemble
from sklearn import exceptions as sklearn_exceptions
from sklearn import feature_selection
from sklearn import linear_model
from sklearn import metrics
from sklearn import preprocessing

from pivq_jax import visualize

# Dense latents with at most this fraction of non-zeros are handed to scikit-learn as sparse
# matrices: the sparse tree splitter touches only non-zeros (~100x faster for presence bits).
_SPARSE_DENSITY = 0.1


# ---------------------------------------------------------------------------------------------
# Input checks and helpers
# ---------------------------------------------------------------------------------------------


def _latent_matrix(latents, name: str):
  """float64 [N, d]: a CSC matrix for sparse, bool or mostly-zero latents, else dense."""
  if sparse.issparse(latents):
    if len(latents.shape) != 2:
      raise ValueError(f"{name} must be [N, d], got shape {latents.shape}")
    x = sparse.csc_matrix(latents, dtype=np.float64)
    x.eliminate_zeros()
    return x
  x = np.asarray(latents)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [N, d], got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
    raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
  if x.dtype == bool or (x.size and np.count_nonzero(x) <= _SPARSE_DENSITY * x.size):
    return sparse.csc_matrix(x, dtype=np.float64)
  return x.astype(np.float64)


def _factor_matrix(factors, name: str, num_rows: int):
  s = np.asarray(factors)
  if s.ndim != 2:
    raise ValueError(f"{name} must be [N, F], got shape {s.shape}")
  if s.shape[0] != num_rows:
    raise ValueError(f"{name} has {s.shape[0]} rows but the latents have {num_rows}")
  if s.shape[1] < 2:
    raise ValueError(f"{name} needs at least 2 factors (entropy base F), got {s.shape[1]}")
  return s


def _check_factors_vary(s, name: str):
  for j in range(s.shape[1]):
    if np.unique(s[:, j]).size < 2:
      raise ValueError(f"factor {j} of {name} is constant, so no classifier or H(s_j) exists")


def _ranges(x) -> np.ndarray:
  """max - min of each latent (implicit zeros count for sparse)."""
  if sparse.issparse(x):
    return (x.max(axis=0).toarray() - x.min(axis=0).toarray()).ravel()
  return x.max(0) - x.min(0) if x.shape[0] else np.zeros(x.shape[1])


def _rows(x, rows):
  return x[rows] if not sparse.issparse(x) else sparse.csc_matrix(x.tocsr()[rows])


def _columns(x) -> Iterator[tuple[np.ndarray | slice, np.ndarray]]:
  """Per latent: (rows, values) of its entries, all rows (dense) or the non-zeros (CSC)."""
  if not sparse.issparse(x):
    for i in range(x.shape[1]):
      yield slice(None), x[:, i]
    return
  for i in range(x.shape[1]):
    lo, hi = x.indptr[i], x.indptr[i + 1]
    yield x.indices[lo:hi], x.data[lo:hi]


def _one_minus_entropy(m: np.ndarray, epsilon: float) -> np.ndarray:
  """1 - H_b(P) per row, P = the row of (m + epsilon) normalised, b = the number of columns.
  This is disentanglement_lib's `1 - scipy.stats.entropy(m + 1e-11, base=b)`; an all-zero
  row (possible with epsilon = 0) counts as uniform, i.e. scores 0, as the epsilon makes it."""
  m = m + epsilon
  total = m.sum(1, keepdims=True)
  p = np.divide(m, total, out=np.full_like(m, 1.0 / m.shape[1]), where=total > 0)
  logp = np.log(p, out=np.zeros_like(p), where=p > 0)
  return 1.0 - (-(p * logp).sum(1) / np.log(m.shape[1]))


# ---------------------------------------------------------------------------------------------
# DCI
# ---------------------------------------------------------------------------------------------


def _one_hot_features(x_train, x_test):
  """One column per (latent, value seen in training); returns both sets and the column ->
  latent map. Binary sparse latents (all stored values 1) are their own one-hot."""
  if sparse.issparse(x_train) and np.all(x_train.data == 1.0):
    return x_train, x_test, np.arange(x_train.shape[1])
  dense = [m.toarray() if sparse.issparse(m) else m for m in (x_train, x_test)]
  encoder = preprocessing.OneHotEncoder(handle_unknown="ignore", sparse_output=True,
                                        dtype=np.float64).fit(dense[0])
  owner = np.repeat(np.arange(x_train.shape[1]), [len(c) for c in encoder.categories_])
  return (sparse.csc_matrix(encoder.transform(dense[0])),
          sparse.csc_matrix(encoder.transform(dense[1])), owner)


def _fit_gbt(x_train, y_train, x_predict_train, x_test, y_test, seed, params):
  """One factor's classifier: (|feature_importances_|, train accuracy, test accuracy)."""
  model = ensemble.GradientBoostingClassifier(random_state=seed, **params)
  model.fit(x_train, y_train)
  return (np.abs(model.feature_importances_),
          float(np.mean(model.predict(x_predict_train) == y_train)),
          float(np.mean(model.predict(x_test) == y_test)))


def dci(latents_train, factors_train, latents_test, factors_test, *, seed: int = 0,
        max_samples: int | None = None, n_estimators: int = 100, learning_rate: float = 0.1,
        max_depth: int = 3, ordinal: bool = True, entropy_epsilon: float = 1e-11,
        n_jobs: int = 1) -> dict:
  """DCI disentanglement, completeness and informativeness (§3.3.1; spec "DCI").

  latents_*: [N, d] numeric (dense, bool or scipy sparse): d scalar codes, or K code-presence
    features. factors_*: [N, F] discrete ground-truth factor values (any labels), F >= 2.
    The spec's protocol draws 10,000 training and 5,000 test points uniformly over factor
    combinations; the caller draws them, so train and test are separate arguments.
  seed: `random_state` of every classifier (ties between equally good splits are broken by
    a seeded feature permutation) and of the `max_samples` subsample.
  max_samples: fit on this many training points drawn without replacement (None: all);
    informativeness_train is then measured on that subset. For the K = 4096 case.
  n_estimators, learning_rate, max_depth: scikit-learn's defaults, which the spec prescribes.
  ordinal: True (the reference's quirk) feeds the latent values as numbers, so trees split
    on thresholds of FactorQVAE's code indices although the codebook order is arbitrary;
    False one-hot encodes each latent's values and sums its columns' importances.
  entropy_epsilon: disentanglement_lib adds 1e-11 to the importance matrix before the
    entropies (the reference quirk); 0 gives the bare formulas.

  Returns {"disentanglement" D, "completeness" C, "informativeness_train",
  "informativeness_test" (mean accuracies over factors), "importance" float[d, F] (M,
  zero rows for latents constant on the training set), "disentanglement_per_latent" [d],
  "completeness_per_factor" [F], "num_active", "num_train"}.
  """
  x_train = _latent_matrix(latents_train, "latents_train")
  x_test = _latent_matrix(latents_test, "latents_test")
  if x_train.shape[1] != x_test.shape[1]:
    raise ValueError(f"latents_train has {x_train.shape[1]} latents but latents_test has "
                     f"{x_test.shape[1]}")
  if x_train.shape[1] < 2:
    raise ValueError(f"DCI needs at least 2 latents (entropy base d), got {x_train.shape[1]}")
  s_train = _factor_matrix(factors_train, "factors_train", x_train.shape[0])
  s_test = _factor_matrix(factors_test, "factors_test", x_test.shape[0])
  if s_train.shape[1] != s_test.shape[1]:
    raise ValueError(f"factors_train has {s_train.shape[1]} factors but factors_test has "
                     f"{s_test.shape[1]}")
  if x_test.shape[0] == 0:
    raise ValueError("latents_test is empty, so there is no test accuracy")
  if max_samples is not None and max_samples < x_train.shape[0]:
    keep = np.sort(np.random.default_rng(seed).choice(x_train.shape[0], max_samples,
                                                      replace=False))
    x_train, s_train = _rows(x_train, keep), s_train[keep]
  _check_factors_vary(s_train, "factors_train")

  num_latents, num_factors = x_train.shape[1], s_train.shape[1]
  active = np.flatnonzero(_ranges(x_train) > 0)  # constants can take no split
  x_train, x_test = x_train[:, active], x_test[:, active]
  if ordinal:
    owner = np.arange(active.size)
  else:
    x_train, x_test, owner = _one_hot_features(x_train, x_test)
  # Trees are fit on CSC and predict from CSR; convert once, not per factor.
  x_predict_train = x_train.tocsr() if sparse.issparse(x_train) else x_train
  x_test = x_test.tocsr() if sparse.issparse(x_test) else x_test
  params = dict(n_estimators=n_estimators, learning_rate=learning_rate, max_depth=max_depth)
  fits = joblib.Parallel(n_jobs=n_jobs)(
      joblib.delayed(_fit_gbt)(x_train, s_train[:, j], x_predict_train, x_test, s_test[:, j],
                               seed, params) for j in range(num_factors))

  importance = np.zeros((num_latents, num_factors))
  for j, (imp, _, _) in enumerate(fits):
    importance[active, j] = np.bincount(owner, weights=imp, minlength=active.size)
  # §3.3.1: P_ij = M_ij / Σ_k M_ik, D_i = 1 + Σ_k P_ik log_F P_ik, ρ_i = Σ_j M_ij / Σ_ij M_ij.
  per_latent = _one_minus_entropy(importance, entropy_epsilon)
  # P̃_ij = M_ij / Σ_k M_kj, C_j = 1 + Σ_k P̃_kj log_d P̃_kj (base d: all latents, pruned
  # ones included, as in the reference), ρ_j = Σ_i M_ij / Σ_ij M_ij.
  per_factor = _one_minus_entropy(importance.T, entropy_epsilon)
  weights = importance if importance.sum() > 0 else np.ones_like(importance)
  rho_latent = weights.sum(1) / weights.sum()
  rho_factor = weights.sum(0) / weights.sum()
  return {
      "disentanglement": float(per_latent @ rho_latent),
      "completeness": float(per_factor @ rho_factor),
      # I: mean accuracy of the F classifiers.
      "informativeness_train": float(np.mean([f[1] for f in fits])),
      "informativeness_test": float(np.mean([f[2] for f in fits])),
      "importance": importance,
      "disentanglement_per_latent": per_latent,
      "completeness_per_factor": per_factor,
      "num_active": int(active.size),
      "num_train": int(x_train.shape[0]),
  }


# ---------------------------------------------------------------------------------------------
# InfoMEC
# ---------------------------------------------------------------------------------------------


def _discrete_mutual_information(x, s_codes, s_sizes) -> np.ndarray:
  """Plug-in I(z_i; s_j) in nats, [d, F]: `sklearn.metrics.mutual_info_score` on each pair,
  from one joint count table per latent (the zero row of a sparse latent comes from the
  class counts, so the cost is O(non-zeros x F), not O(N x d x F))."""
  n = x.shape[0]
  offsets = np.concatenate([[0], np.cumsum(s_sizes)])
  class_counts = np.concatenate([np.bincount(s_codes[:, j], minlength=c)
                                 for j, c in enumerate(s_sizes)]).astype(np.float64)
  shifted = s_codes + offsets[:-1]  # every factor's classes in one axis of width Σ_j C_j
  mi = np.zeros((x.shape[1], len(s_sizes)))
  for i, (rows, values) in enumerate(_columns(x)):
    if len(values) == 0:
      continue  # all zero: constant, no information
    uniques, inverse = np.unique(values, return_inverse=True)
    joint = np.bincount((inverse[:, None] * offsets[-1] + shifted[rows]).ravel(),
                        minlength=len(uniques) * offsets[-1]).reshape(len(uniques), -1)
    value_counts = np.bincount(inverse, minlength=len(uniques))
    if len(values) < n:  # the implicit zeros of a sparse column (0 is not a stored value)
      joint = np.vstack([joint, class_counts - joint.sum(0)])
      value_counts = np.append(value_counts, n - len(values))
    joint = joint.astype(np.float64)
    outer = value_counts[:, None] * class_counts[None, :]
    terms = np.where(joint > 0, joint * np.log(np.maximum(joint, 1) * n / outer), 0.0)
    mi[i] = np.add.reduceat(terms.sum(0), offsets[:-1]) / n
  return np.maximum(mi, 0.0)


def _logistic_log_loss(features, y, seed, max_iter):
  """In-sample log loss of a multinomial logistic regression with no penalty and balanced
  class weights (spec "InfoE"); returns (H, converged)."""
  model = linear_model.LogisticRegression(C=np.inf, class_weight="balanced", tol=1e-4,
                                          max_iter=max_iter, random_state=seed)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sklearn_exceptions.ConvergenceWarning)
    model.fit(features, y)
  loss = metrics.log_loss(y, model.predict_proba(features), labels=model.classes_)
  return float(loss), bool(np.all(model.n_iter_ < max_iter))


def _explicitness(features, y, seed, max_iter):
  """NMI_V(z -> s_j) = (H_V(s_j|∅) - H_V(s_j|z)) / H_V(s_j|∅) (§3.3.2); the null model sees
  one all-zero feature, i.e. only its intercept (the reference feeds d zero columns)."""
  h_pred, converged = _logistic_log_loss(features, y, seed, max_iter)
  h_null, _ = _logistic_log_loss(np.zeros((len(y), 1)), y, seed, max_iter)
  return (h_null - h_pred) / h_null, converged


def infomec(latents, factors, *, discrete: bool = True, seed: int = 0,
            max_samples: int | None = None, n_neighbors: int = 3, max_iter: int = 500,
            n_jobs: int = 1) -> dict:
  """InfoM, InfoE and InfoC (§3.3.2; spec "InfoMEC"), all in-sample as in the reference.

  latents: [N, d] numeric (dense, bool or scipy sparse). factors: [N, F] discrete factor
    values (any labels), F >= 2.
  discrete: True for quantized latents (code indices, presence bits): plug-in mutual
    information on the values, no binning; InfoE's regression sees each latent one-hot.
    False for continuous latents: each latent standardised, then scikit-learn's k-NN
    estimator (`mutual_info_classif`, `n_neighbors`; FactorQVAE's code keeps the default 3,
    QLAE's uses 10); InfoE's regression sees the standardised latents.
  seed: `random_state` of the k-NN estimator's jitter, the regressions and `max_samples`.
  max_samples: use this many points drawn without replacement (None: all).
  max_iter: L-BFGS cap of InfoE's regressions (FactorQVAE's reference: 500; QLAE's: 100).
  n_jobs: joblib processes over InfoE's factors (and the k-NN estimator's latents).

  Active latents (spec): range > 0 (discrete) or > max range / 20 (continuous), on the raw
  latents. InfoM averages over active latents, InfoC normalises by their number L; InfoE,
  as in the reference, uses every latent (constant ones are dropped: with an intercept and
  no penalty they change nothing). One-hot columns: a two-valued latent gets one indicator
  column instead of the reference's two, the same model class once there is an intercept,
  so the same infimum, and K presence bits stay a sparse [N, K] matrix instead of [N, 2K].

  Returns {"infom", "infoe", "infoc", "nmi" float[d, F] (NMI_ij, all latents),
  "infoe_per_factor" [F], "active" bool[d], "num_active", "num_samples", "converged" (every
  InfoE regression stopped before max_iter)}. A latent whose NMI row sums to 0 (a factor
  whose column does) has an undefined max/sum ratio (0/0, NaN in the reference); such
  rows (columns) are left out of InfoM's (InfoC's) mean. InfoC is NaN below 2 active latents.
  """
  x = _latent_matrix(latents, "latents")
  s = _factor_matrix(factors, "factors", x.shape[0])
  if max_samples is not None and max_samples < x.shape[0]:
    keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_samples, replace=False))
    x, s = _rows(x, keep), s[keep]
  _check_factors_vary(s, "factors")
  num_latents, num_factors = x.shape[1], s.shape[1]
  # LabelEncoder-style class indices per factor.
  encoded = [np.unique(s[:, j], return_inverse=True) for j in range(num_factors)]
  s_codes = np.stack([inverse.reshape(-1) for _, inverse in encoded], 1)
  s_sizes = [len(classes) for classes, _ in encoded]

  ranges = _ranges(x)
  active = ranges > 0 if discrete else ranges > ranges.max(initial=0.0) / 20
  varying = np.flatnonzero(ranges > 0)

  # NMI_ij = I(z_i; s_j) / H(s_j), H(s_j) the plug-in entropy in nats.
  entropy = np.array([-np.sum(p * np.log(p)) for p in
                      (np.bincount(s_codes[:, j]) / len(s_codes) for j in range(num_factors))])
  mi = np.zeros((num_latents, num_factors))
  if discrete:
    mi[varying] = _discrete_mutual_information(x[:, varying], s_codes, s_sizes)
    if sparse.issparse(x) and np.all(x.data == 1.0):
      features = sparse.csr_matrix(x[:, varying])  # presence bits: their own one-hot
    else:
      dense = x[:, varying].toarray() if sparse.issparse(x) else x[:, varying]
      features = preprocessing.OneHotEncoder(drop="if_binary", sparse_output=True,
                                             dtype=np.float64).fit_transform(dense)
  else:
    dense = x[:, varying].toarray() if sparse.issparse(x) else x[:, varying]
    features = preprocessing.StandardScaler().fit_transform(dense)
    for j in range(num_factors):
      mi[varying, j] = feature_selection.mutual_info_classif(
          features, s_codes[:, j], discrete_features=False, n_neighbors=n_neighbors,
          random_state=seed, n_jobs=n_jobs)
  nmi = mi / entropy

  pruned = nmi[active]
  num_active = int(active.sum())
  # InfoM = (1/L Σ_i max_j NMI_ij / Σ_j NMI_ij - 1/F) / (1 - 1/F).
  row_sum = pruned.sum(1)
  rows = row_sum > 0
  infom = ((np.mean(pruned[rows].max(1) / row_sum[rows]) - 1 / num_factors)
           / (1 - 1 / num_factors)) if rows.any() else float("nan")
  # InfoC = (1/F Σ_j max_i NMI_ij / Σ_i NMI_ij - 1/L) / (1 - 1/L), L active latents.
  col_sum = pruned.sum(0)
  cols = col_sum > 0
  infoc = ((np.mean(pruned.max(0, initial=0.0)[cols] / col_sum[cols]) - 1 / num_active)
           / (1 - 1 / num_active)) if num_active >= 2 and cols.any() else float("nan")

  # InfoE = 1/F Σ_j NMI_V(z -> s_j), from the regressions' log losses.
  if features.shape[1] == 0:  # every latent constant: the regression is the null model
    explicit = [(0.0, True)] * num_factors
  else:
    explicit = joblib.Parallel(n_jobs=n_jobs)(
        joblib.delayed(_explicitness)(features, s_codes[:, j], seed, max_iter)
        for j in range(num_factors))
  per_factor = np.array([e for e, _ in explicit])
  return {
      "infom": float(infom),
      "infoe": float(per_factor.mean()),
      "infoc": float(infoc),
      "nmi": nmi,
      "infoe_per_factor": per_factor,
      "active": active,
      "num_active": num_active,
      "num_samples": int(x.shape[0]),
      "converged": all(c for _, c in explicit),
  }


# ---------------------------------------------------------------------------------------------
# Picture
# ---------------------------------------------------------------------------------------------
def plot_scores(path, importance: np.ndarray, nmi: np.ndarray, factor_names, *,
                latent_labels=None, top: int = 32, title: str = ""):
  """A PNG of DCI's importance matrix M and InfoMEC's NMI side by side (latents x factors).

  A disentangled code shows one bright cell per row (D, InfoM), a complete one one per
  column (C, InfoC). Rows are the `top` latents by total importance (all d of FactorQVAE;
  the busiest of PI-VQ's K presence bits), in their original order. Returns uint8[H, W, 3].
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (slow import)

  importance, nmi = np.asarray(importance, np.float64), np.asarray(nmi, np.float64)
  labels = list(latent_labels if latent_labels is not None else range(importance.shape[0]))
  rows = np.sort(np.argsort(-importance.sum(1), kind="stable")[:top])
  fig, axes = plt.subplots(1, 2, figsize=(2.0 + 0.9 * len(factor_names),
                                          1.5 + 0.22 * len(rows)), dpi=100)
  for ax, m, name in ((axes[0], importance, "DCI importance"), (axes[1], nmi, "InfoMEC NMI")):
    im = ax.imshow(m[rows], aspect="auto", cmap="viridis", vmin=0)
    ax.set_title(name)
    ax.set_xticks(range(len(factor_names)), factor_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [labels[i] for i in rows], fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.05)
  axes[0].set_ylabel("latent")
  if title:
    fig.suptitle(title, fontsize=9)
  return visualize.save_figure(path, fig)
