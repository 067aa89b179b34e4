"""Evaluation of frozen embeddings: kNN classification, recall@k and a linear probe.

* :func:`knn_predict` / :func:`knn_accuracy` follow DINO's weighted kNN (Caron et al. 2021, ``eval_knn.py``):
  cosine similarity, the k = 20 most similar training vectors vote for their label with weight
  ``exp(similarity / T)``, T = 0.07. ``weighting="majority"`` gives every neighbour one vote.
* :func:`recall_at_k` measures an approximate index against exact neighbours ("10-recall@10");
  :func:`label_recall_at_k` is the Recall@K of metric-learning papers (a same-label item in the top k).
* :func:`linear_probe` fits a logistic regression on frozen features, choosing the regularisation (and,
  given several, the feature tap) on a validation split carved out of the training set. The test set is
  used once, for the final number. :func:`select_c` and :func:`probe_classifier` are its parts, shared
  with the few-shot probes of ``training/evaluate.py``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from visreg_hub.errors import UserInputError, require_extra
from visreg_hub.retrieval.arrays import as_float32_matrix

logger = logging.getLogger(__name__)

WEIGHTINGS = ("dino", "majority")


def _as_labels(labels: Any, n: int, name: str) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise UserInputError(
            f"{name} must have shape ({n},) to match the features, got {tuple(labels.shape)}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserInputError(f"{name} must be integer class ids, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def knn_predict(
    train_features: Any,
    train_labels: Any,
    query_features: Any,
    *,
    k: int = 20,
    temperature: float = 0.07,
    weighting: str = "dino",
    batch_size: int = 1024,
) -> np.ndarray:
    """Predict labels by k-nearest-neighbour vote over cosine similarity.

    Args:
        train_features: (N, D) floating features of the labelled set (L2-normalised here).
        train_labels: (N,) integer labels.
        query_features: (Q, D) floating features to classify.
        k: neighbours per query (DINO uses 20); clipped to N.
        temperature: T in the vote weight ``exp(cos / T)`` (DINO uses 0.07); ignored for majority.
        weighting: ``"dino"`` (weighted vote) or ``"majority"`` (one vote per neighbour). Ties between
            classes go to the smallest label.
        batch_size: queries per similarity block, bounding memory at ``batch_size * N`` floats.

    Returns:
        int64 (Q,) predicted labels.
    """
    if weighting not in WEIGHTINGS:
        raise UserInputError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserInputError(f"k must be a positive integer, got {k!r}")
    if not (isinstance(temperature, int | float) and temperature > 0 and math.isfinite(temperature)):
        raise UserInputError(f"temperature must be a positive number, got {temperature!r}")
    train = as_float32_matrix(train_features, name="train_features")
    queries = as_float32_matrix(query_features, name="query_features", dim=train.shape[1])
    labels = _as_labels(train_labels, train.shape[0], "train_labels")
    classes, label_index = np.unique(labels, return_inverse=True)
    k_eff = min(k, train.shape[0])
    if k_eff < k:
        logger.warning("k=%d exceeds the %d training vectors; using k=%d", k, train.shape[0], k_eff)

    import torch  # here, not at module level, so `import visreg_hub.retrieval` stays light

    train_t = torch.nn.functional.normalize(torch.from_numpy(train), dim=1)
    label_t = torch.from_numpy(label_index.reshape(-1)).long()
    predictions = []
    for start in range(0, queries.shape[0], batch_size):
        block = torch.nn.functional.normalize(torch.from_numpy(queries[start : start + batch_size]), dim=1)
        similarity, neighbours = (block @ train_t.T).topk(k_eff, dim=1)
        votes = torch.exp(similarity / temperature) if weighting == "dino" else torch.ones_like(similarity)
        scores = torch.zeros(block.shape[0], classes.size, dtype=torch.float64)
        scores.scatter_add_(1, label_t[neighbours], votes.double())
        predictions.append(scores.argmax(dim=1).numpy())  # argmax returns the first maximum on ties
    predicted = np.concatenate(predictions) if predictions else np.zeros((0,), dtype=np.int64)
    return classes[predicted].astype(np.int64)


def knn_accuracy(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    k: int = 20,
    temperature: float = 0.07,
    weighting: str = "dino",
) -> float:
    """Top-1 accuracy of :func:`knn_predict` on a labelled test set, in [0, 1].

    Args:
        train_features: (N, D). train_labels: (N,). test_features: (Q, D). test_labels: (Q,).
        k, temperature, weighting: as in :func:`knn_predict`.
    """
    predicted = knn_predict(
        train_features, train_labels, test_features, k=k, temperature=temperature, weighting=weighting
    )
    truth = _as_labels(test_labels, predicted.shape[0], "test_labels")
    return float((predicted == truth).mean())


def recall_at_k(retrieved_ids: Any, true_ids: Any, k: int | None = None) -> float:
    """Neighbour recall of an approximate search: mean over queries of ``|top-k retrieved ∩ true| / |true|``.

    Args:
        retrieved_ids: (Q, K1) integer ids returned by the approximate search, best first.
        true_ids: (Q, K2) exact neighbour ids, best first; ``-1`` entries are ignored.
        k: how many columns of each to compare; None uses K2.

    Returns:
        recall in [0, 1] (1.0 when the approximate index finds every true neighbour).
    """
    retrieved = np.asarray(retrieved_ids)
    truth = np.asarray(true_ids)
    if retrieved.ndim != 2 or truth.ndim != 2 or retrieved.shape[0] != truth.shape[0]:
        raise UserInputError(
            f"retrieved_ids and true_ids must be (Q, K) arrays with the same Q, got "
            f"{retrieved.shape} and {truth.shape}"
        )
    k = truth.shape[1] if k is None else k
    if k < 1:
        raise UserInputError(f"k must be >= 1, got {k}")
    recalls = []
    for got, want in zip(retrieved[:, :k].tolist(), truth[:, :k].tolist(), strict=True):
        wanted = {i for i in want if i != -1}
        if wanted:
            recalls.append(len(wanted.intersection(got)) / len(wanted))
    if not recalls:
        raise UserInputError("true_ids holds no valid ids (all -1)")
    return float(np.mean(recalls))


def label_recall_at_k(query_labels: Any, neighbor_labels: Any, k: int) -> float:
    """Recall@K of metric learning: fraction of queries with a same-label item among the top k results.

    Args:
        query_labels: (Q,) labels of the queries.
        neighbor_labels: (Q, K1) labels of the retrieved items, best first (exclude the query itself).
        k: cut-off, 1 <= k <= K1.
    """
    neighbours = np.asarray(neighbor_labels)
    if neighbours.ndim != 2:
        raise UserInputError(f"neighbor_labels must be (Q, K), got shape {neighbours.shape}")
    queries = _as_labels(query_labels, neighbours.shape[0], "query_labels")
    if not 1 <= k <= neighbours.shape[1]:
        raise UserInputError(f"k must be in [1, {neighbours.shape[1]}] (columns of neighbor_labels), got {k}")
    return float((neighbours[:, :k] == queries[:, None]).any(axis=1).mean())


@dataclass(frozen=True)
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        test_accuracy: accuracy on the test set of the model refit on all training data with ``best_c``.
        val_accuracy: validation accuracy of ``best_c`` (and of ``tap``).
        best_c: inverse regularisation strength chosen on the validation split.
        val_accuracies: validation accuracy of every candidate C (of the chosen ``tap``).
        predictions: (Q,) the refit model's label for each test sample (not part of ``==``).
        tap: the feature tap chosen on the validation split when ``linear_probe`` was given several
            (``None`` for a single feature matrix).
        tap_accuracies: best validation accuracy of every candidate tap (empty for a single matrix).
    """

    test_accuracy: float
    val_accuracy: float
    best_c: float
    val_accuracies: dict[float, float]
    predictions: np.ndarray = field(
        repr=False, compare=False, default_factory=lambda: np.empty(0, dtype=np.int64)
    )
    tap: str | None = None
    tap_accuracies: dict[str, float] = field(default_factory=dict)


def _check_cs(cs: Sequence[float]) -> None:
    if not cs or any(not (isinstance(c, int | float) and c > 0) for c in cs):
        raise UserInputError(f"cs must be a non-empty sequence of positive numbers, got {cs!r}")


def probe_classifier(c: float, *, standardize: bool = True, max_iter: int = 1000):
    """The probe's model: z-scored features (statistics of the data it is fit on) + logistic regression."""
    require_extra("sklearn", "train")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classifier = LogisticRegression(C=float(c), max_iter=max_iter)
    return make_pipeline(StandardScaler(), classifier) if standardize else classifier


def fit_quietly(classifier, x: np.ndarray, y: np.ndarray, what: str):
    """``classifier.fit(x, y)``, with scikit-learn's multi-line ConvergenceWarning (one per fit; they
    filled half of an evaluation's output) replaced by one log line: an L-BFGS stopped at ``max_iter`` is
    common at the weakest regularisation, and its accuracy is measured all the same."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(x, y)
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            logger.info("linear probe %s: L-BFGS stopped at max_iter before converging", what)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return classifier


def select_c(
    x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, cs: Sequence[float], **model
) -> tuple[float, dict[float, float]]:
    """Fit each C on the fit part, score it on the validation part: ``(best C, {C: accuracy})``.

    The best C is the smallest (strongest regularisation) among those tied for the top accuracy.
    ``model``: ``standardize`` / ``max_iter`` of :func:`probe_classifier`.
    """
    _check_cs(cs)
    scores = {}
    for c in sorted(float(c) for c in cs):
        classifier = fit_quietly(probe_classifier(c, **model), x_fit, y_fit, f"C={c:g}")
        scores[c] = float(classifier.score(x_val, y_val))
        logger.info("linear probe C=%g: validation accuracy %.4f", c, scores[c])
    best = max(scores, key=lambda c: (scores[c], -c))
    return best, scores


# The probe protocol of ``training/evaluate.py`` and the model cards, and the defaults of linear_probe, so
# that the library and the evaluation script give the same number for the same features.
PROBE_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
PROBE_VAL_FRACTION = 0.1


def linear_probe(
    train_features: Any,
    train_labels: Any,
    test_features: Any,
    test_labels: Any,
    *,
    cs: Sequence[float] = PROBE_CS,
    val_fraction: float = PROBE_VAL_FRACTION,
    standardize: bool = True,
    max_iter: int = 1000,
    seed: int = 0,
) -> LinearProbeResult:
    """Logistic-regression probe on frozen features; C chosen on a validation split of the training set.

    The training set is split (stratified when every class has >= 2 samples) into fit/validation parts;
    each C is fit on the fit part and scored on the validation part; the best C (smallest on ties, i.e.
    the strongest regularisation) is refit on the whole training set and scored once on the test set.
    Needs scikit-learn (the ``train`` extra).

    Several feature taps of the same images (e.g. ``{"cls": ..., "cls_last4": ...}`` from
    ``encode(pooling=...)``) may be passed as two dicts with the same keys: the tap is then chosen
    together with C, on the same validation split (ties go to the tap listed first), as DINO's linear
    evaluation chooses how many blocks' CLS tokens to concatenate. The test set is still used once.

    Args:
        train_features: (N, D) array, or ``{tap: (N, D_tap)}``. train_labels: (N,).
        test_features: (Q, D) array, or ``{tap: (Q, D_tap)}`` with the keys of ``train_features``.
        test_labels: (Q,).
        cs: candidate inverse regularisation strengths.
        val_fraction: share of the training set held out for choosing C, in (0, 1).
        standardize: z-score features with statistics of the data each model is fit on.
        max_iter: L-BFGS iterations.
        seed: seed of the split.
    """
    require_extra("sklearn", "train")
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise UserInputError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    _check_cs(cs)
    several = isinstance(train_features, Mapping)
    train_taps, test_taps = _feature_taps(train_features, test_features)
    first = next(iter(train_taps.values()))
    y_train = _as_labels(train_labels, first.shape[0], "train_labels")
    y_test = _as_labels(test_labels, next(iter(test_taps.values())).shape[0], "test_labels")
    _, counts = np.unique(y_train, return_counts=True)
    stratify = y_train if counts.min() >= 2 else None
    fit_rows, val_rows = train_test_split(
        np.arange(len(y_train)), test_size=val_fraction, random_state=seed, stratify=stratify
    )  # one split for every tap, so their validation accuracies compare like with like

    model = {"standardize": standardize, "max_iter": max_iter}
    choices = {}  # tap -> (best C, {C: validation accuracy})
    for tap, x in train_taps.items():
        choices[tap] = select_c(x[fit_rows], y_train[fit_rows], x[val_rows], y_train[val_rows], cs, **model)
    tap_accuracies = {tap: scores[best] for tap, (best, scores) in choices.items()}
    tap = max(tap_accuracies, key=tap_accuracies.get)  # first listed on ties (dicts keep order)
    best_c, val_accuracies = choices[tap]
    final = fit_quietly(probe_classifier(best_c, **model), train_taps[tap], y_train, f"C={best_c:g} (refit)")
    predictions = final.predict(test_taps[tap])
    return LinearProbeResult(
        test_accuracy=float((predictions == y_test).mean()),
        val_accuracy=val_accuracies[best_c],
        best_c=best_c,
        val_accuracies=val_accuracies,
        predictions=predictions,
        tap=tap if several else None,
        tap_accuracies=tap_accuracies if several else {},
    )


def _feature_taps(train: Any, test: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Both sides as ``{tap: float32 (N, D)}``; one unnamed matrix becomes ``{"features": ...}``."""
    if isinstance(train, Mapping) != isinstance(test, Mapping):
        raise UserInputError(
            "pass train_features and test_features both as arrays or both as {tap: array} dicts"
        )
    if not isinstance(train, Mapping):
        train, test = {"features": train}, {"features": test}
    if not train or list(train) != list(test):
        raise UserInputError(
            f"train_features and test_features must name the same taps in the same order, got "
            f"{list(train)} and {list(test)}"
        )
    rows = None
    train_taps, test_taps = {}, {}
    for tap in train:
        train_taps[tap] = as_float32_matrix(train[tap], name=f"train_features[{tap!r}]")
        test_taps[tap] = as_float32_matrix(
            test[tap], name=f"test_features[{tap!r}]", dim=train_taps[tap].shape[1]
        )
        if rows is not None and (train_taps[tap].shape[0], test_taps[tap].shape[0]) != rows:
            raise UserInputError(
                f"every tap must hold the same images; {tap!r} has a different number of rows"
            )
        rows = (train_taps[tap].shape[0], test_taps[tap].shape[0])
    return train_taps, test_taps
