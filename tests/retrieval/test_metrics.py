"""kNN accuracy, recall@k and the linear probe against hand-written references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from visreg_hub.retrieval import (
    knn_accuracy,
    knn_predict,
    label_recall_at_k,
    linear_probe,
    recall_at_k,
)


def knn_by_hand(train, labels, queries, k, temperature, weighting):
    """Plain-Python transcription of DINO's weighted kNN vote (float64, explicit loops)."""
    predictions = []
    for query in queries.astype(np.float64):
        sims = []
        for j, row in enumerate(train.astype(np.float64)):
            cos = float(query @ row) / (math.sqrt(float(query @ query)) * math.sqrt(float(row @ row)))
            sims.append((cos, j))
        sims.sort(key=lambda item: -item[0])
        votes: dict[int, float] = {}
        for cos, j in sims[:k]:
            weight = math.exp(cos / temperature) if weighting == "dino" else 1.0
            votes[int(labels[j])] = votes.get(int(labels[j]), 0.0) + weight
        best = max(votes.values())
        predictions.append(min(label for label, v in votes.items() if v == best))  # ties -> smallest label
    return np.array(predictions)


@pytest.fixture
def toy():
    """Three overlapping Gaussian clusters in 8-D with non-contiguous labels 3, 7, 11."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 8)) * 1.2
    label_values = np.array([3, 7, 11])
    train_class = rng.integers(0, 3, 150)
    test_class = rng.integers(0, 3, 60)
    train = (centers[train_class] + rng.standard_normal((150, 8))).astype(np.float32)
    test = (centers[test_class] + rng.standard_normal((60, 8))).astype(np.float32)
    return train, label_values[train_class], test, label_values[test_class]


@pytest.mark.parametrize("weighting", ["dino", "majority"])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_hand_written_brute_force(toy, weighting, k):
    train, train_labels, test, test_labels = toy
    want = knn_by_hand(train, train_labels, test, k, 0.07, weighting)
    got = knn_predict(train, train_labels, test, k=k, weighting=weighting, batch_size=16)
    np.testing.assert_array_equal(got, want)
    accuracy = knn_accuracy(train, train_labels, test, test_labels, k=k, weighting=weighting)
    assert accuracy == pytest.approx(float((want == test_labels).mean()))
    assert 0.5 < accuracy < 1.0  # overlapping clusters: informative but not trivial


def test_dino_weighting_differs_from_majority_where_it_should():
    # one near-identical neighbour of class 0 vs two mediocre neighbours of class 1
    train = np.array([[1.0, 0.01], [0.5, 0.866], [0.5, -0.866]], dtype=np.float32)
    labels = np.array([0, 1, 1])
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    assert knn_predict(train, labels, query, k=3, weighting="dino").tolist() == [0]
    assert knn_predict(train, labels, query, k=3, weighting="majority").tolist() == [1]
    # with a huge temperature every weight is ~1, so the weighted vote becomes the majority vote
    assert knn_predict(train, labels, query, k=3, temperature=1e6).tolist() == [1]


def test_knn_on_real_fashion_mnist_pixels(fmnist_train, fmnist_test):
    train_images, train_labels = fmnist_train
    test_images, test_labels = fmnist_test
    train = train_images.reshape(len(train_images), -1).astype(np.float32) / 255
    test = test_images[:60].reshape(60, -1).astype(np.float32) / 255
    want = knn_by_hand(train, train_labels, test, 20, 0.07, "dino")
    np.testing.assert_array_equal(knn_predict(train, train_labels, test), want)
    full = knn_accuracy(train, train_labels, test_images.reshape(200, -1).astype(np.float32), test_labels)
    assert 0.6 < full < 0.95  # raw-pixel kNN on 500 Fashion-MNIST images is known to land near 0.7


def test_knn_input_errors(toy):
    train, train_labels, test, _ = toy
    with pytest.raises(ValueError, match="weighting"):
        knn_predict(train, train_labels, test, weighting="cosine")
    with pytest.raises(ValueError, match="dimension 4"):
        knn_predict(train, train_labels, test[:, :4])
    with pytest.raises(ValueError, match="train_labels must have shape"):
        knn_predict(train, train_labels[:-1], test)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, train_labels, test, temperature=0)


def test_recall_at_k_by_hand():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[1, 9, 3, 2], [8, 0, 0, 5]])
    # query 0: top-2 {1, 9} vs {1, 2} -> 1/2 ; query 1: {8, 0} vs {5, 6} -> 0
    assert recall_at_k(approx, exact, k=2) == pytest.approx(0.25)
    # k=4: {1, 9, 3, 2} vs {1, 2, 3, 4} -> 3/4 ; {8, 0, 5} vs {5, 6, 7, 8} -> 2/4
    assert recall_at_k(approx, exact) == pytest.approx(0.625)
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k(np.array([[1, -1]]), np.array([[1, -1]])) == 1.0  # -1 padding ignored


def test_label_recall_at_k_by_hand():
    query_labels = np.array([0, 1, 2])
    neighbour_labels = np.array([[1, 0, 0], [1, 1, 1], [0, 1, 1]])
    assert label_recall_at_k(query_labels, neighbour_labels, 1) == pytest.approx(1 / 3)
    assert label_recall_at_k(query_labels, neighbour_labels, 2) == pytest.approx(2 / 3)
    assert label_recall_at_k(query_labels, neighbour_labels, 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k must be in"):
        label_recall_at_k(query_labels, neighbour_labels, 4)


def test_linear_probe_selects_on_validation_never_on_test(toy):
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, train_labels, test, test_labels = toy
    cs = (1e-3, 1e-1, 10.0)
    result = linear_probe(train, train_labels, test, test_labels, cs=cs, seed=3, val_fraction=0.2)

    # independent re-run of the documented protocol
    x_fit, x_val, y_fit, y_val = train_test_split(
        train, train_labels, test_size=0.2, random_state=3, stratify=train_labels
    )
    val = {
        c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
        .fit(x_fit, y_fit)
        .score(x_val, y_val)
        for c in cs
    }
    best = max(sorted(val), key=lambda c: (val[c], -c))
    assert result.val_accuracies == pytest.approx(val)
    assert result.best_c == best
    final = make_pipeline(StandardScaler(), LogisticRegression(C=best, max_iter=1000)).fit(
        train, train_labels
    )
    assert result.test_accuracy == pytest.approx(final.score(test, test_labels))
    assert result.test_accuracy > 0.6

    # the choice must not depend on test labels: scrambling them changes only the test accuracy
    scrambled = linear_probe(train, train_labels, test, np.roll(test_labels, 1), cs=cs, seed=3,
                             val_fraction=0.2)  # fmt: skip
    assert scrambled.best_c == result.best_c
    assert scrambled.val_accuracies == result.val_accuracies
    assert scrambled.test_accuracy != result.test_accuracy


def test_linear_probe_validates_arguments(toy):
    pytest.importorskip("sklearn")
    train, train_labels, test, test_labels = toy
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(train, train_labels, test, test_labels, val_fraction=1.5)
    with pytest.raises(ValueError, match="cs must be"):
        linear_probe(train, train_labels, test, test_labels, cs=(0.0,))


def test_linear_probe_chooses_the_tap_on_validation_with_one_split(toy):
    """Two taps of the same samples: the class signal, and the signal drowned in noise dimensions.

    The independent re-run scores every (tap, C) on the one documented split, takes the best tap, refits
    it on all of train and predicts the test set once."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, train_labels, test, test_labels = toy
    rng = np.random.default_rng(1)
    noisy_train = np.concatenate([0.3 * train, 3 * rng.standard_normal((len(train), 24))], axis=1)
    noisy_test = np.concatenate([0.3 * test, 3 * rng.standard_normal((len(test), 24))], axis=1)
    taps_train = {"noisy": noisy_train, "clean": train}  # the worse tap first: order must not decide
    taps_test = {"noisy": noisy_test, "clean": test}
    cs = (1e-2, 1.0)
    result = linear_probe(taps_train, train_labels, taps_test, test_labels, cs=cs, seed=5, val_fraction=0.2)

    fit, val = train_test_split(
        np.arange(len(train_labels)), test_size=0.2, random_state=5, stratify=train_labels
    )

    def model(c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))

    scores = {
        tap: {c: model(c).fit(x[fit], train_labels[fit]).score(x[val], train_labels[val]) for c in cs}
        for tap, x in taps_train.items()
    }
    best = {tap: max(sorted(s), key=lambda c: (s[c], -c)) for tap, s in scores.items()}
    tap = max(scores, key=lambda t: scores[t][best[t]])
    assert tap == "clean" and result.tap == "clean"
    assert result.tap_accuracies == pytest.approx({t: scores[t][best[t]] for t in scores})
    assert result.best_c == best[tap] and result.val_accuracies == pytest.approx(scores[tap])
    final = model(best[tap]).fit(taps_train[tap], train_labels)
    np.testing.assert_array_equal(result.predictions, final.predict(taps_test[tap]))
    assert result.test_accuracy == pytest.approx(final.score(taps_test[tap], test_labels))

    # one matrix: no tap is reported, and the result equals the dict form restricted to that tap
    single = linear_probe(train, train_labels, test, test_labels, cs=cs, seed=5, val_fraction=0.2)
    assert single.tap is None and single.tap_accuracies == {}
    assert single.test_accuracy == result.test_accuracy and single.best_c == result.best_c


def test_linear_probe_rejects_mismatched_taps(toy):
    pytest.importorskip("sklearn")
    train, train_labels, test, test_labels = toy
    with pytest.raises(ValueError, match="both as arrays or both as"):
        linear_probe({"a": train}, train_labels, test, test_labels)
    with pytest.raises(ValueError, match="same taps in the same order"):
        linear_probe({"a": train, "b": train}, train_labels, {"b": test, "a": test}, test_labels)
    with pytest.raises(ValueError, match="same images"):
        linear_probe({"a": train, "b": train[:-1]}, train_labels, {"a": test, "b": test}, test_labels)


def test_the_library_probe_defaults_are_the_evaluation_protocol(toy):
    """Probe 10: linear_probe defaulted to a 20 % split and C up to 100 while training/evaluate.py (and the
    model cards) use 10 % and C up to 10, so the two gave 59.0 and 55.0 on the same features."""
    import inspect

    from training import evaluate

    defaults = inspect.signature(linear_probe).parameters
    assert defaults["val_fraction"].default == 0.1 and tuple(defaults["cs"].default) == evaluate.DEFAULT_CS
    assert evaluate.parse_args(["some-model"]).val_fraction == 0.1


def test_a_probe_that_stops_at_max_iter_logs_one_line_instead_of_sklearns_warnings(caplog):
    """A fresh-clone user: two multi-line ConvergenceWarnings filled 20 of evaluate.py's 45 lines."""
    import warnings

    from visreg_hub.retrieval.metrics import linear_probe

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((120, 16)), rng.integers(0, 4, 120)
    logged = caplog.at_level("INFO", "visreg_hub.retrieval.metrics")
    with warnings.catch_warnings(record=True) as caught, logged:
        warnings.simplefilter("always")
        result = linear_probe(x[:90], y[:90], x[90:], y[90:], cs=(10.0,), max_iter=2)
    assert not [w for w in caught if "Converge" in w.category.__name__]
    assert caplog.text.count("L-BFGS stopped at max_iter") == 2  # the C=10 fit, and its refit
    assert 0.0 <= result.test_accuracy <= 1.0
