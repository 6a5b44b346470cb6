"""The searches: WeakNAS, random search and regularised evolution, over a fixed candidate set.

A searcher only proposes and observes; it never evaluates, so the same object drives the asynchronous
Ray loop (:mod:`jobs.nas.run`: propose as many as there are free slots, observe each result as it comes)
and the tabular benchmark (propose a batch, observe it, repeat). It sees a score only after it asked for
it. ``state_dict()`` is plain JSON (RNG state included), so a stopped search continues where it was.

Architectures are rows of the candidate array (N, num_decisions); proposals are row indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from jobs.nas.config import EvolutionConfig, WeakNasConfig
from jobs.nas.predictor import fit_predict


@dataclass(frozen=True)
class Proposal:
    index: int
    predicted: float | None = None  # the predictor's (z-scored) estimate when it was chosen, if any


class Searcher:
    """Bookkeeping shared by every search: what was proposed, what came back, the RNG."""

    def __init__(self, candidates_ND: np.ndarray, seed: int):
        self.candidates = candidates_ND
        self.rng = np.random.default_rng(seed)
        self.seen = np.zeros(len(candidates_ND), bool)  # proposed, whether or not the result is back
        self.observed: list[tuple[int, float | None]] = []  # in the order results came back; None = failed
        self.pending: list[int] = []

    def propose(self, num: int) -> list[Proposal]:
        """Up to ``num`` new architectures (fewer when the search must first wait for results)."""
        chosen = self._choose(num)
        for p in chosen:
            assert not self.seen[p.index], "an architecture was proposed twice"
            self.seen[p.index] = True
            self.pending.append(p.index)
        return chosen

    def observe(self, index: int, score: float | None) -> None:
        """The result of a proposed architecture; ``None`` records a failed trial (never proposed again)."""
        self.pending.remove(index)
        self.observed.append((index, score))

    def scored(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = [(i, s) for i, s in self.observed if s is not None]
        return np.array([i for i, _ in pairs], dtype=np.int64), np.array([s for _, s in pairs], dtype=np.float64)

    def _random(self, num: int) -> list[Proposal]:
        free = np.flatnonzero(~self.seen)
        picks = self.rng.choice(free, size=min(num, len(free)), replace=False)
        return [Proposal(int(i)) for i in picks]

    def _choose(self, num: int) -> list[Proposal]:
        raise NotImplementedError

    def rank_correlation(self) -> float | None:
        """Kendall's tau of the predictor's estimates against the scores of the last batch (WeakNAS only)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "observed": [list(o) for o in self.observed], "pending": list(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.observed = [(int(i), s) for i, s in state["observed"]]
        self.pending = [int(i) for i in state["pending"]]
        self.seen[:] = False
        self.seen[[i for i, _ in self.observed] + self.pending] = True


class RandomSearch(Searcher):
    """Uniform sampling without replacement."""

    def _choose(self, num: int) -> list[Proposal]:
        return self._random(num)


class Evolution(Searcher):
    """Regularised (aging) evolution: tournament of ``tournament`` among the last ``population`` results,
    the winner's child differs in one decision. Children are always new architectures (a random unseen
    neighbour; a random unseen candidate when every neighbour in the candidate set was seen)."""

    def __init__(self, candidates_ND: np.ndarray, seed: int, cfg: EvolutionConfig):
        super().__init__(candidates_ND, seed)
        self.cfg = cfg
        self.radix = candidates_ND.max(axis=0) + 1
        self.strides = np.concatenate([np.cumprod(self.radix[::-1])[::-1][1:], [1]])
        self.row_of = {int(code): row for row, code in enumerate(candidates_ND @ self.strides)}

    def _choose(self, num: int) -> list[Proposal]:
        out: list[Proposal] = []
        for _ in range(num):
            if len(self.observed) + len(self.pending) + len(out) < self.cfg.population:
                out += self._random_excluding(out)
                continue
            population = [(i, s) for i, s in self.observed[-self.cfg.population :] if s is not None]
            if not population:
                if self.pending:
                    break  # wait for the population's results
                out += self._random_excluding(out)  # every recent trial failed: start again from a random one
                continue
            picks = self.rng.choice(len(population), size=min(self.cfg.tournament, len(population)), replace=False)
            parent = max((population[k] for k in picks), key=lambda pair: pair[1])[0]
            child = self._mutate(parent, {p.index for p in out})
            out += [Proposal(child)] if child is not None else self._random_excluding(out)
        return out

    def _random_excluding(self, chosen: list[Proposal]) -> list[Proposal]:
        free = np.flatnonzero(~self.seen)
        free = free[~np.isin(free, [p.index for p in chosen])]
        return [Proposal(int(self.rng.choice(free)))] if len(free) else []

    def _mutate(self, parent: int, taken: set[int]) -> int | None:
        arch = self.candidates[parent]
        codes = []
        base = int(arch @ self.strides)
        for d, stride in enumerate(self.strides):
            codes += [base + (c - int(arch[d])) * int(stride) for c in range(int(self.radix[d])) if c != arch[d]]
        rows = [self.row_of[c] for c in codes if c in self.row_of]
        fresh = [r for r in rows if not self.seen[r] and r not in taken]
        return int(self.rng.choice(fresh)) if fresh else None


class WeakNas(Searcher):
    """WeakNAS: ``num_initial`` random queries, then repeatedly fit the weak predictor on every queried
    architecture, rank all candidates, and sample uniformly among the unqueried ones of the predicted top-K
    (the next best predicted ones if fewer than needed are left there)."""

    def __init__(self, candidates_ND: np.ndarray, seed: int, cfg: WeakNasConfig, features_NF: np.ndarray):
        super().__init__(candidates_ND, seed)
        self.cfg = cfg
        self.seed = seed
        self.features = features_NF
        self.predicted: dict[int, float] = {}
        self._order: np.ndarray | None = None  # candidates by predicted score, best first
        self._fitted_on = -1  # number of results the current ranking was fitted on

    def top_k(self) -> int:
        iteration = max(0, len(self.observed) - self.cfg.num_initial) // self.cfg.num_per_iteration
        return max(self.cfg.top_k_end, round(self.cfg.top_k_start * self.cfg.top_k_decay**iteration))

    def _choose(self, num: int) -> list[Proposal]:
        proposed = len(self.observed) + len(self.pending)
        if proposed < self.cfg.num_initial:
            return self._random(min(num, self.cfg.num_initial - proposed))
        if self.pending and len(self.observed) < self.cfg.num_initial:
            return []  # the first predictor is fitted on the whole initial set
        queried, scores = self.scored()
        if len(queried) < 2:
            return self._random(num)  # nothing to fit yet (the initial trials failed)
        if self._fitted_on != len(self.observed):
            # The fit's own randomness depends only on (seed, results so far): a resumed search refits to
            # the same ranking. Ties (trees predict plateaus) are broken at random, not by candidate order.
            fit_rng = np.random.default_rng([self.seed, len(self.observed)])
            prediction = fit_predict(self.cfg.predictor, self.features, queried, scores, int(fit_rng.integers(2**31)))
            self._order = np.lexsort((fit_rng.random(len(prediction)), -prediction))
            self._prediction = prediction
            self._fitted_on = len(self.observed)
        top = self._order[: self.top_k()]
        free = top[~self.seen[top]]
        if len(free) >= num:
            picks = self.rng.choice(free, size=num, replace=False)
        else:
            rest = self._order[~self.seen[self._order]]
            picks = rest[:num]  # the top region is used up: take the best predicted unqueried ones
        out = [Proposal(int(i), float(self._prediction[i])) for i in picks]
        self.predicted.update((p.index, p.predicted) for p in out)
        return out

    @property
    def best_predicted(self) -> int | None:
        """The candidate the latest fit ranks first (what the search would answer if stopped now)."""
        return None if self._order is None else int(self._order[0])

    def rank_correlation(self) -> float | None:
        last = [(self.predicted[i], s) for i, s in self.observed if s is not None and i in self.predicted][-self.cfg.num_per_iteration :]
        if len(last) < 2:
            return None
        tau = kendalltau([p for p, _ in last], [s for _, s in last]).statistic
        return None if np.isnan(tau) else float(tau)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "predicted": [[i, p] for i, p in self.predicted.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.predicted = {int(i): p for i, p in state["predicted"]}
        self._fitted_on = -1


def make_searcher(method: str, candidates_ND: np.ndarray, features_NF: np.ndarray, seed: int, *, weaknas: WeakNasConfig, evolution: EvolutionConfig) -> Searcher:
    if method == "weaknas":
        return WeakNas(candidates_ND, seed, weaknas, features_NF)
    if method == "evolution":
        return Evolution(candidates_ND, seed, evolution)
    return RandomSearch(candidates_ND, seed)
