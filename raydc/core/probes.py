"""k-NN and linear probes: how the SSL libraries compare frozen features, so raydc's numbers can sit beside theirs.

Both train on the labelled features of one split and score another; neither touches the network. The k-NN probe
is solo-learn's and lightly's weighted k-NN (Wu et al. 2018): cosine similarity, the k nearest training
features each vote for their class with weight exp(similarity / T), T = 0.07. The linear probe is a
multinomial logistic regression on standardised features: sklearn's (L-BFGS, to convergence) while the training
features fit in memory, else a torch linear layer fitted by SGD over blocks handed in one at a time, so only
one block and the d x C weights are ever in memory.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.07


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class KNNProbe:
    """Weighted k-NN over a training bank held in a faiss flat inner-product index (exact search). Test
    features are scored block by block (`add_test`), so the test split may be any size; the bank is in memory."""

    def __init__(self, train_x: np.ndarray, train_y: np.ndarray, ks: Iterable[int] = KNN_KS,
                 temperature: float = KNN_TEMPERATURE, num_classes: int | None = None):
        import faiss

        if len(train_x) == 0:
            raise ValueError("the k-NN probe needs at least one training feature")
        self.train_y = np.asarray(train_y, np.int64)
        self.num_classes = int(num_classes if num_classes is not None else self.train_y.max() + 1)
        self.ks = tuple(int(k) for k in ks)
        self.temperature = float(temperature)
        self.index = faiss.IndexFlatIP(train_x.shape[1])
        self.index.add(_unit(train_x))
        self.correct = {k: 0 for k in self.ks}
        self.n = 0

    def predict(self, x: np.ndarray, k: int) -> np.ndarray:
        """The class with the largest sum of exp(cos / T) over the k nearest training features."""
        k = min(k, self.index.ntotal)
        sims, idx = self.index.search(_unit(x), k)
        return self._vote(sims, idx)

    def _vote(self, sims: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # exp((s - 1) / T): the same argmax as exp(s / T), without overflowing float32 at T = 0.07.
        w = np.exp((sims.astype(np.float64) - 1.0) / self.temperature)
        votes = np.zeros((len(sims), self.num_classes), np.float64)
        np.add.at(votes, (np.repeat(np.arange(len(sims)), sims.shape[1]), self.train_y[idx].ravel()), w.ravel())
        return votes.argmax(axis=1)

    def add_test(self, x: np.ndarray, y: np.ndarray) -> None:
        """Score one block of test features: one search at the largest k serves every k."""
        if len(x) == 0:
            return
        kmax = min(max(self.ks), self.index.ntotal)
        sims, idx = self.index.search(_unit(x), kmax)
        y = np.asarray(y, np.int64)
        for k in self.ks:
            kk = min(k, kmax)
            self.correct[k] += int((self._vote(sims[:, :kk], idx[:, :kk]) == y).sum())
        self.n += len(x)

    def result(self) -> dict:
        return {**{f"knn_top1_k{k}": self.correct[k] / max(self.n, 1) for k in self.ks},
                "knn_temperature": self.temperature, "train_images": int(self.index.ntotal),
                "test_images": int(self.n)}


@dataclass
class Standardiser:
    """Per-dimension mean and std from moments accumulated block by block (float64), so the streamed probe
    sees the same standardised features as the in-memory one."""

    n: int = 0
    s: np.ndarray | None = None
    ss: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        if self.s is None:
            self.s, self.ss = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        self.n += len(x)
        self.s += x.sum(0)
        self.ss += (x * x).sum(0)

    @property
    def mean(self) -> np.ndarray:
        return self.s / max(self.n, 1)

    @property
    def std(self) -> np.ndarray:
        var = np.maximum(self.ss / max(self.n, 1) - self.mean ** 2, 0.0)
        return np.sqrt(var) + 1e-6

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.std).astype(np.float32)


def linear_probe_in_memory(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                           *, c: float = 1.0, max_iter: int = 1000, seed: int = 0) -> dict:
    """sklearn's multinomial logistic regression (L-BFGS) on standardised features."""
    from sklearn.linear_model import LogisticRegression

    st = Standardiser()
    st.add(train_x)
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(st.apply(train_x), np.asarray(train_y, np.int64))
    pred = clf.predict(st.apply(test_x))
    return {"linear_top1": float((pred == np.asarray(test_y)).mean()), "linear_solver": "sklearn-lbfgs",
            "linear_c": c, "linear_iterations": int(np.max(clf.n_iter_)),
            "train_images": len(train_x), "test_images": len(test_x)}


@dataclass
class StreamedLinearProbe:
    """A torch linear layer fitted by mini-batch SGD (momentum, cosine lr) over blocks of (features, labels)
    that `blocks()` yields afresh each epoch: the probe for training splits that do not fit in memory. The
    standardisation comes from one pass of moments first. Deterministic for a given seed and block order."""

    num_classes: int
    epochs: int = 20
    lr: float = 0.1
    batch_size: int = 256
    weight_decay: float = 0.0
    seed: int = 0
    standardiser: Standardiser = field(default_factory=Standardiser)

    def fit(self, blocks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]) -> StreamedLinearProbe:
        import math

        import torch

        for x, _ in blocks():
            self.standardiser.add(x)
        d = self.standardiser.s.shape[0]
        g = torch.Generator().manual_seed(self.seed)
        self.layer = torch.nn.Linear(d, self.num_classes)
        with torch.no_grad():
            self.layer.weight.normal_(0.0, 0.01, generator=g)
            self.layer.bias.zero_()
        opt = torch.optim.SGD(self.layer.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        steps_per_epoch = max(1, math.ceil(self.standardiser.n / self.batch_size))
        total, step = self.epochs * steps_per_epoch, 0
        for _ in range(self.epochs):
            for x, y in blocks():
                xt = torch.from_numpy(self.standardiser.apply(x))
                yt = torch.from_numpy(np.asarray(y, np.int64))
                order = torch.randperm(len(xt), generator=g)
                for i in range(0, len(xt), self.batch_size):
                    sel = order[i:i + self.batch_size]
                    for group in opt.param_groups:
                        group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
                    loss = torch.nn.functional.cross_entropy(self.layer(xt[sel]), yt[sel])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    step += 1
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.layer(torch.from_numpy(self.standardiser.apply(x))).argmax(1).numpy()

    def score(self, blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
        correct = n = 0
        for x, y in blocks:
            correct += int((self.predict(x) == np.asarray(y)).sum())
            n += len(x)
        return {"linear_top1": correct / max(n, 1), "linear_solver": "torch-sgd", "linear_epochs": self.epochs,
                "linear_lr": self.lr, "train_images": int(self.standardiser.n), "test_images": int(n)}
