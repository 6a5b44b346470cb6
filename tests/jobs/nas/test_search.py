"""The searches on the NAS-Bench-201 table: WeakNAS finds the optimum fast, sees only what it queried,
resumes from its state exactly, and the baselines keep their definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs.nas.config import EvolutionConfig, WeakNasConfig
from jobs.nas.search import Evolution, RandomSearch, WeakNas, make_searcher
from jobs.nas.space import Nb201Space
from jobs.nas.table import read_table


@pytest.fixture(scope="module")
def table(nb201_table):
    return read_table(str(nb201_table), Nb201Space())


# The tests check the mechanics with a 4 x 100 MLP: the default 4 x 1000 ranks better but costs ~5 s a fit.
SMALL_MLP = {"kind": "mlp", "hidden_sizes": [100, 100, 100, 100]}


def searcher(method: str, table, seed: int, **weaknas):
    features = Nb201Space().encode(table.choices_ND)
    cfg = WeakNasConfig(**{"predictor": SMALL_MLP, **weaknas})
    return make_searcher(method, table.choices_ND, features, seed, weaknas=cfg, evolution=EvolutionConfig())


def drive(s, scores: np.ndarray, *, batch: int, max_queries: int, until_best: bool = True) -> list[int]:
    """The synchronous loop of the benchmark: propose a batch, observe it, repeat."""
    queried: list[int] = []
    while len(queried) < max_queries:
        for p in s.propose(min(batch, max_queries - len(queried))):
            queried.append(p.index)
            s.observe(p.index, float(scores[p.index]))
            if until_best and scores[p.index] == scores.max():
                return queried
    return queried


def test_weaknas_finds_the_global_optimum_in_far_fewer_queries_than_random(table):
    counts = [len(drive(searcher("weaknas", table, seed), table.scores, batch=10, max_queries=2000)) for seed in range(3)]
    # Random search needs (15625 + 1) / 3 = 5,209 queries on average for one of the 2 best cells.
    assert max(counts) < 1000, counts
    assert len(drive(searcher("weaknas", table, 0), table.scores, batch=10, max_queries=2000)) == counts[0]  # seeded


def test_weaknas_never_sees_the_score_of_an_architecture_it_did_not_query(table):
    queried = drive(searcher("weaknas", table, 7), table.scores, batch=10, max_queries=60, until_best=False)
    altered = table.scores.copy()
    others = np.setdiff1d(np.arange(len(altered)), queried)
    altered[others] = np.random.default_rng(0).uniform(0, 100, len(others))  # every unqueried label changes
    assert drive(searcher("weaknas", table, 7), altered, batch=10, max_queries=60, until_best=False) == queried


@pytest.mark.parametrize("method", ["weaknas", "evolution", "random"])
def test_a_search_resumed_from_its_json_state_continues_exactly(table, method):
    batch = 10 if method == "weaknas" else 3
    whole = drive(searcher(method, table, 3), table.scores, batch=batch, max_queries=60, until_best=False)
    first = searcher(method, table, 3)
    head = drive(first, table.scores, batch=batch, max_queries=30, until_best=False)
    state = json.loads(json.dumps(first.state_dict()))  # what state.json holds
    second = searcher(method, table, 12345)  # the seed does not matter once the state is loaded
    if method == "weaknas":
        second.seed = 3  # the refit seed is the search's, part of its config
    second.load_state_dict(state)
    tail = drive(second, table.scores, batch=batch, max_queries=30, until_best=False)
    assert head + tail == whole


def test_weaknas_samples_inside_the_predicted_top_k_and_waits_for_its_initial_set(table):
    s = searcher("weaknas", table, 1, num_initial=10, top_k_start=50, top_k_end=50)
    initial = s.propose(25)
    assert len(initial) == 10 and all(p.predicted is None for p in initial)  # M0 random ones first
    for p in initial[:9]:
        s.observe(p.index, float(table.scores[p.index]))
    assert s.propose(5) == []  # the first fit waits for the whole initial set
    s.observe(initial[9].index, None)  # a failed trial counts as back, without a score
    picks = s.propose(10)
    ranked = s._order[:50]
    assert len(picks) == 10 and all(p.index in ranked and p.predicted is not None for p in picks)
    assert not {p.index for p in picks} & {p.index for p in initial}


def test_weaknas_rank_correlation_is_measured_on_the_last_batch(table):
    s = searcher("weaknas", table, 2)
    drive(s, table.scores, batch=10, max_queries=80, until_best=False)
    tau = s.rank_correlation()
    assert tau is not None and -1 <= tau <= 1
    last = [(s.predicted[i], sc) for i, sc in s.observed if i in s.predicted][-10:]
    assert len(last) == 10


def test_evolution_children_are_one_mutation_from_a_population_member(table):
    s = searcher("evolution", table, 4)
    assert isinstance(s, Evolution)
    drive(s, table.scores, batch=1, max_queries=10, until_best=False)  # the initial population
    for _ in range(30):
        population = {i for i, _ in s.observed[-10:]}
        child = s.propose(1)[0].index
        distances = [int((table.choices_ND[child] != table.choices_ND[i]).sum()) for i in population]
        assert min(distances) == 1
        s.observe(child, float(table.scores[child]))


def test_evolution_goes_on_when_its_whole_population_failed(table):
    s = searcher("evolution", table, 4)
    for p in s.propose(10):
        s.observe(p.index, None)  # every trial of the population failed
    more = s.propose(3)
    assert len(more) == 3 and not {p.index for p in more} & {i for i, _ in s.observed}


def test_random_search_never_repeats_and_failed_trials_are_never_proposed_again(table):
    s = searcher("random", table, 5)
    assert isinstance(s, RandomSearch)
    first = s.propose(100)
    for p in first:
        s.observe(p.index, None)
    rest = s.propose(len(table.scores))
    indices = [p.index for p in first + rest]
    assert len(indices) == len(set(indices)) == len(table.scores)
    assert s.propose(5) == []  # nothing left


def test_weaknas_with_tree_predictors_runs(table):
    for kind in ("gbt", "rf"):
        s = searcher("weaknas", table, 0, predictor={"kind": kind, "num_trees": 20})
        assert isinstance(s, WeakNas)
        assert len(drive(s, table.scores, batch=10, max_queries=40, until_best=False)) == 40
        assert s.rank_correlation() is not None
