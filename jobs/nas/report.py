"""The search's files: ``state.json`` (resumable), ``history.json``, ``best.json`` and ``best_so_far.png``.

Paths are local (written atomically: a temporary file, then a rename) or s3:// (one PUT is atomic).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from jobs.nas.config import NasConfig
from labtrain.data.s3 import open_url


def write_bytes(url: str, data: bytes) -> None:
    if "://" in url:
        with open_url(url, "wb") as stream:
            stream.write(data)
        return
    os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
    tmp = f"{url}.tmp"
    with open(tmp, "wb") as stream:
        stream.write(data)
    os.replace(tmp, url)


def write_json(url: str, value: Any) -> None:
    write_bytes(url, json.dumps(value, indent=1).encode())


def read_json(url: str) -> Any | None:
    """The parsed file, or None when it does not exist."""
    try:
        with open_url(url, "rb") as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def method_summary(trials: list[dict], table_best: float | None) -> dict:
    """Finished trials in the order they finished, the best one, and (for a table) when its optimum came."""
    finished = sorted((t for t in trials if t["status"] != "pending"), key=lambda t: t["n"])
    done = [t for t in finished if t["status"] == "done"]
    best = max(done, key=lambda t: t["score"]) if done else None
    summary = {
        "num_done": len(done),
        "num_failed": len(finished) - len(done),
        "num_pending": len(trials) - len(finished),
        "best": None if best is None else {"arch": best["arch"], "score": best["score"], "trial": best["n"]},
        "trials": finished,
    }
    if table_best is not None:
        hits = [t["n"] for t in done if t["score"] >= table_best]
        summary["queries_to_table_best"] = hits[0] if hits else None
    return summary


def best_so_far(trials: list[dict]) -> list[float | None]:
    """Best score after each finished trial (None until the first success)."""
    out, best = [], None
    for t in trials:
        if t["status"] == "done":
            best = t["score"] if best is None else max(best, t["score"])
        out.append(best)
    return out


def plot(history: dict, table_best: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, summary in history["methods"].items():
        curve = best_so_far(summary["trials"])
        ax.step(range(1, len(curve) + 1), [float("nan") if v is None else v for v in curve], where="post", label=method)
    if table_best is not None:
        ax.axhline(table_best, color="grey", linestyle=":", label=f"table best {table_best:g}")
    ax.set_xscale("log")
    ax.set_xlabel("architectures queried")
    ax.set_ylabel("best score so far")
    ax.set_title(f"{history['name']}: {history['space']} space, {history['evaluator']} evaluator")
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(out_dir: str, cfg: NasConfig, state: dict, *, table_best: float | None) -> dict:
    """history.json (every finished trial per method), best.json and best_so_far.png; returns the history."""
    history = {
        "name": cfg.name,
        "space": cfg.space.kind,
        "evaluator": cfg.evaluator.kind,
        "table_best": table_best,
        "methods": {m: method_summary(r["trials"], table_best) for m, r in state["methods"].items()},
    }
    bests = [(m, s["best"]) for m, s in history["methods"].items() if s["best"] is not None]
    overall = max(bests, key=lambda pair: pair[1]["score"], default=None)
    best = {"method": overall[0], **overall[1]} if overall else None
    write_json(f"{out_dir}/history.json", history)
    write_json(f"{out_dir}/best.json", {"best": best, "per_method": {m: s["best"] for m, s in history["methods"].items()}})
    write_bytes(f"{out_dir}/best_so_far.png", plot(history, table_best))
    return history
