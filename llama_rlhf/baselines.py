"""Non-neural baselines for reward models: answer length and a TF-IDF logistic regression.

A reward model is worth its compute only if it ranks held-out pairs better than these:
  - longer answer wins: score = length of the answer;
  - shorter answer wins: score = -length of the answer;
  - bag of words: a logistic regression on tfidf(chosen) - tfidf(rejected), trained on the same
    training pairs as the reward model.
Every baseline is a scorer of single answers, so its pairs go through the same
`reward_model.evaluation.evaluate_scores` as a neural reward model, and a tie (two answers of
equal length, or of equal bag-of-words score) counts as a wrong ranking.

The TF-IDF baseline uses scikit-learn, which is therefore a runtime dependency of this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, GroupKFold

LENGTH_PREFERENCES = ("longer", "shorter")


def length_scores(lengths: Sequence[int] | np.ndarray, prefer: str) -> np.ndarray:
    """Scores answers by their length alone.

    Args:
      lengths: length of each answer (in tokens, say), [N].
      prefer: "longer" (score = length) or "shorter" (score = -length).

    Returns:
      float64 scores, [N].
    """
    if prefer not in LENGTH_PREFERENCES:
        raise ValueError(f"Unknown length preference {prefer!r}; expected one of "
                         f"{LENGTH_PREFERENCES}.")
    lengths = np.asarray(lengths, np.float64)
    return lengths if prefer == "longer" else -lengths


def _check_pairs(chosen_texts: Sequence[str], rejected_texts: Sequence[str], minimum: int
                 ) -> None:
    if len(chosen_texts) != len(rejected_texts):
        raise ValueError(f"Expected as many chosen as rejected answers, got {len(chosen_texts)} "
                         f"and {len(rejected_texts)}.")
    if len(chosen_texts) < minimum:
        raise ValueError(f"Expected at least {minimum} training pairs, got {len(chosen_texts)}.")


class TfidfPreferenceModel:
    """A bag-of-words reward model: score(answer) = w · tfidf(answer).

    Training fits a logistic regression without intercept on the pair features
    x = tfidf(chosen) - tfidf(rejected) with label 1, and on the flipped pairs -x with label 0,
    so that P(chosen preferred) = σ(w · x) = σ(score(chosen) - score(rejected)), a
    Bradley-Terry model like a neural reward model's. The regularization strength C is picked
    by cross-validation on the training pairs, with both copies of a pair always in the same
    fold so that the flipped copy never reveals a held-out label.

    Attributes:
      vectorizer: the fitted `TfidfVectorizer` (vocabulary from the training answers only).
      classifier: the fitted `LogisticRegression`, refit on all training pairs with the C
        that cross-validation picked.
    """

    def __init__(
        self,
        *,
        ngram_range: tuple[int, int] = (1, 2),
        min_df: int = 2,
        c_grid: Sequence[float] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
        folds: int = 5,
    ):
        self.vectorizer = TfidfVectorizer(ngram_range=ngram_range, min_df=min_df,
                                          sublinear_tf=True)
        self.c_grid = tuple(c_grid)
        self.folds = folds
        self.classifier: LogisticRegression | None = None

    def fit(self, chosen_texts: Sequence[str], rejected_texts: Sequence[str]
            ) -> TfidfPreferenceModel:
        """Fits the vocabulary and the weights on training pairs; returns self."""
        # Cross-validation needs one pair per fold at least.
        _check_pairs(chosen_texts, rejected_texts, minimum=self.folds)
        num = len(chosen_texts)
        self.vectorizer.fit(list(chosen_texts) + list(rejected_texts))
        features = (self.vectorizer.transform(chosen_texts)
                    - self.vectorizer.transform(rejected_texts))
        # Rows 0..N-1 are the pairs as given (label 1), rows N..2N-1 the flipped pairs (label 0).
        inputs = sparse.vstack([features, -features]).tocsr()
        labels = np.concatenate([np.ones(num, np.int64), np.zeros(num, np.int64)])
        groups = np.concatenate([np.arange(num), np.arange(num)])
        splits = list(GroupKFold(n_splits=self.folds).split(inputs, labels, groups))
        search = GridSearchCV(
            LogisticRegression(fit_intercept=False, max_iter=2000),
            {"C": list(self.c_grid)}, scoring="accuracy", cv=splits,
        )
        search.fit(inputs, labels)
        self.classifier = search.best_estimator_
        return self

    @property
    def regularization(self) -> float:
        """The inverse regularization strength C picked by cross-validation."""
        if self.classifier is None:
            raise RuntimeError("TfidfPreferenceModel.fit must run before reading C.")
        return float(self.classifier.C)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Returns w · tfidf(text) of each answer, [N] float64."""
        if self.classifier is None:
            raise RuntimeError("TfidfPreferenceModel.fit must run before scoring.")
        weights = self.classifier.coef_[0]
        return np.asarray(self.vectorizer.transform(list(texts)) @ weights, np.float64)
