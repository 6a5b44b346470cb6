"""Search spaces as vectors of categorical decisions: NAS-Bench-201 cells and a small 3-D CNN (AutoX3D-like).

An architecture is a tuple of choice indices, one per decision; its string is the space's own notation
(NAS-Bench-201: ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``). Predictors see the one-hot encoding of the
choices (for NAS-Bench-201 the 6 edges x 5 operations = 30-d vector of WeakNAS). The search works on a
candidate set: the whole space when it is small enough to enumerate, else a seeded random pool.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np

from jobs.nas.config import Nb201SpaceConfig, X3dSpaceConfig

NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
# The 6 edges (to node, from node) in the order of the string notation: node 1, then node 2, then node 3.
NB201_EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
_NB201_RE = re.compile(r"^\|([a-z_0-9]+)~0\|\+\|([a-z_0-9]+)~0\|([a-z_0-9]+)~1\|\+\|([a-z_0-9]+)~0\|([a-z_0-9]+)~1\|([a-z_0-9]+)~2\|$")


class ArchError(ValueError):
    """A string that does not name an architecture of the space; the message says what is expected."""


@dataclass(frozen=True)
class Decision:
    name: str
    choices: tuple[str, ...]


class Space:
    """A product of categorical decisions. Subclasses give the decisions and the string notation."""

    name: str
    decisions: tuple[Decision, ...]

    @property
    def size(self) -> int:
        return math.prod(len(d.choices) for d in self.decisions)

    @property
    def num_features(self) -> int:
        return sum(len(d.choices) for d in self.decisions)

    def parse(self, text: str) -> tuple[int, ...]:
        raise NotImplementedError

    def format(self, arch: tuple[int, ...]) -> str:
        raise NotImplementedError

    def choices(self, arch: tuple[int, ...]) -> dict[str, str]:
        """``{decision name: chosen value}``, what a model builder reads."""
        return {d.name: d.choices[c] for d, c in zip(self.decisions, arch)}

    def encode(self, archs_ND: np.ndarray) -> np.ndarray:
        """One-hot features (N, num_features) float32 of choice indices (N, num_decisions)."""
        offsets = np.cumsum([0] + [len(d.choices) for d in self.decisions[:-1]])
        out = np.zeros((len(archs_ND), self.num_features), np.float32)
        rows = np.arange(len(archs_ND))[:, None]
        out[rows, archs_ND + offsets] = 1.0
        return out

    def candidates(self, max_candidates: int, seed: int) -> np.ndarray:
        """Every architecture (size x num_decisions) when there are at most ``max_candidates``, else a
        seeded random pool of that many distinct ones."""
        sizes = [len(d.choices) for d in self.decisions]
        if self.size <= max_candidates:
            return np.array(list(itertools.product(*[range(n) for n in sizes])), dtype=np.int64).reshape(-1, len(sizes))
        rng = np.random.default_rng(seed)
        pool: dict[tuple[int, ...], None] = {}  # distinct, in the order drawn: a prefix is a uniform sample
        while len(pool) < max_candidates:
            pool.update(dict.fromkeys(map(tuple, rng.integers(0, sizes, size=(max_candidates, len(sizes))))))
        return np.array(list(pool)[:max_candidates], dtype=np.int64)

    def neighbours(self, arch: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Every architecture one decision away (the mutations of regularised evolution)."""
        out = []
        for i, decision in enumerate(self.decisions):
            for c in range(len(decision.choices)):
                if c != arch[i]:
                    out.append(arch[:i] + (c,) + arch[i + 1 :])
        return out

    def probe_archs(self) -> list[tuple[int, ...]]:
        """A few architectures that together use every choice of every decision (for a dry build)."""
        widest = max(len(d.choices) for d in self.decisions)
        return [tuple(k % len(d.choices) for d in self.decisions) for k in range(widest)]


class Nb201Space(Space):
    """NAS-Bench-201: a 4-node cell, 6 edges, 5 operations each: 5**6 = 15,625 cells."""

    name = "nb201"
    decisions = tuple(Decision(f"edge_{to}_{src}", NB201_OPS) for to, src in NB201_EDGES)

    def parse(self, text: str) -> tuple[int, ...]:
        match = _NB201_RE.match(text.strip())
        if not match:
            raise ArchError(f"{text!r} is not a NAS-Bench-201 cell: expected |op~0|+|op~0|op~1|+|op~0|op~1|op~2| with op in {', '.join(NB201_OPS)}")
        unknown = [op for op in match.groups() if op not in NB201_OPS]
        if unknown:
            raise ArchError(f"{text!r}: unknown operation {unknown[0]!r}; the operations are {', '.join(NB201_OPS)}")
        return tuple(NB201_OPS.index(op) for op in match.groups())

    def format(self, arch: tuple[int, ...]) -> str:
        ops = [NB201_OPS[c] for c in arch]
        nodes = [[f"{ops[e]}~{src}" for e, (to, src) in enumerate(NB201_EDGES) if to == node] for node in (1, 2, 3)]
        return "|" + "|+|".join("|".join(node) for node in nodes) + "|"


class X3dSpace(Space):
    """Per stage: block type, width, expansion ratio and attention of a small 3-D CNN (AutoX3D's decisions).

    Notation: ``|x3d,w16,e2,se|res,w24,e1,none|...|``, one ``block,wWIDTH,eEXPANSION,attention`` per stage.
    """

    name = "x3d"

    def __init__(self, cfg: X3dSpaceConfig):
        self.cfg = cfg
        per_stage = (
            ("block", tuple(cfg.block_types)),
            ("width", tuple(str(w) for w in cfg.widths)),
            ("expansion", tuple(str(e) for e in cfg.expansions)),
            ("attention", tuple(cfg.attention)),
        )
        self.decisions = tuple(Decision(f"stage{s + 1}_{name}", choices) for s in range(cfg.num_stages) for name, choices in per_stage)

    def stages(self, arch: tuple[int, ...]) -> list[dict[str, str]]:
        values = list(self.choices(arch).values())
        return [dict(zip(("block", "width", "expansion", "attention"), values[i : i + 4])) for i in range(0, len(values), 4)]

    def format(self, arch: tuple[int, ...]) -> str:
        return "|" + "|".join(f"{s['block']},w{s['width']},e{s['expansion']},{s['attention']}" for s in self.stages(arch)) + "|"

    def parse(self, text: str) -> tuple[int, ...]:
        expected = f"|block,wWIDTH,eEXPANSION,attention| for each of the {self.cfg.num_stages} stages"
        parts = text.strip().strip("|").split("|") if text.strip().startswith("|") and text.strip().endswith("|") else []
        if len(parts) != self.cfg.num_stages:
            raise ArchError(f"{text!r} is not an architecture of this x3d space: expected {expected}")
        arch: list[int] = []
        for stage, part in enumerate(parts, 1):
            fields = part.split(",")
            if len(fields) != 4 or not fields[1].startswith("w") or not fields[2].startswith("e"):
                raise ArchError(f"{text!r}: stage {stage} is {part!r}; expected {expected}")
            values = (fields[0], fields[1][1:], fields[2][1:], fields[3])
            for decision, value in zip(self.decisions[4 * (stage - 1) : 4 * stage], values):
                if value not in decision.choices:
                    raise ArchError(f"{text!r}: stage {stage} {decision.name.split('_', 1)[1]} {value!r} is not one of {', '.join(decision.choices)}")
                arch.append(decision.choices.index(value))
        return tuple(arch)


def build_space(cfg: Nb201SpaceConfig | X3dSpaceConfig) -> Space:
    return Nb201Space() if cfg.kind == "nb201" else X3dSpace(cfg)
