"""``posttrain compare``: several runs side by side, as a table and a PNG.

Reads each run directory's ``metrics.jsonl`` and ``summary.json`` (no torch import) and draws,
one line per run: the training loss, the reward margin, the chosen and rejected log-probs, and
the held-out preference accuracy before and after training. When a run is an online run, the
mean training reward is drawn too, and with a critic (PPO) what tells whether to trust it: the
explained variance of the returns by the values, and the value loss, each on its own axis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

PANELS = (
    ("loss", "training loss"),
    ("rewards/margins", "reward margin (chosen - rejected)"),
    ("logps", "log-probs: chosen (solid), rejected (dashed)"),
    ("heldout", "held-out preference accuracy"),
)
# Drawn when at least one run logged the metric (online runs; PPO's critic).
EXTRA_PANELS = (
    ("reward", "online: mean training reward"),
    ("critic/explained_variance", "critic: explained variance of the returns (1 = perfect)"),
    ("critic/value_loss", "critic: value loss"),
)


@dataclass
class Run:
    label: str
    path: Path
    metrics: list[dict]
    summary: dict

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(m["step"], m[key]) for m in self.metrics
                  if isinstance(m.get(key), (int, float)) and "eval_loss" not in m]
        return [p[0] for p in points], [p[1] for p in points]

    def heldout(self, when: str, key: str = "preference_accuracy"):
        return ((self.summary.get(when) or {}).get("heldout") or {}).get(key)

    def answers(self, when: str):
        return ((self.summary.get(when) or {}).get("answers") or {}).get("answer_accuracy")

    def benchmarks(self) -> dict:
        """{task/metric: (before, after)} of lm-eval: the summary's records, else the run's eval.json."""
        from .benchmarks import headline

        records = dict(self.summary.get("lm_eval") or {})
        if "after" not in records and (self.path / "eval.json").is_file():
            records["after"] = json.loads((self.path / "eval.json").read_text(encoding="utf-8"))
        before, after = headline(records.get("before") or {}), headline(records.get("after") or {})
        return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))}


def pipeline_stages(path: Path) -> list[Path]:
    """The stage run directories of a pipeline directory (``01-sft``, ``02-dpo``...), in order."""
    return sorted(p for p in path.iterdir() if p.is_dir() and p.name[:2].isdigit() and p.name[2:3] == "-"
                  and (p / "metrics.jsonl").is_file()) if path.is_dir() else []


def load_runs(path: str | Path) -> list[Run]:
    """A run directory, or every stage of a pipeline directory."""
    path = Path(path)
    if not (path / "metrics.jsonl").is_file() and pipeline_stages(path):
        return [load_run(stage, label=f"{path.name}/{stage.name}") for stage in pipeline_stages(path)]
    return [load_run(path)]


def load_run(path: str | Path, label: str | None = None) -> Run:
    path = Path(path)
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise UserError(f"'{path}' is not a run directory (no metrics.jsonl) or a pipeline directory",
                        field="RUN_DIR", fix="give directories written by `posttrain run`")
    metrics = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    summary_file = path / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    plugins = "+".join(summary.get("plugins", []))
    label = label or path.name
    label = f"{label} ({plugins})" if plugins else label
    return Run(label, path, metrics, summary)


def table(runs: list[Run]) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    header = ["run", "steps", "final loss", "final margin", "pref acc before", "pref acc after",
              "answer acc before", "answer acc after"]
    critic = any(run.series("critic/explained_variance")[0] for run in runs)
    if critic:
        header.append("critic EV (last third)")
    bench = sorted({key for run in runs for key in run.benchmarks()})
    header += [f"{key} (before -> after)" for key in bench]
    rows = []
    for run in runs:
        _, losses = run.series("loss")
        _, margins = run.series("rewards/margins")
        row = [run.label, str(run.summary.get("global_step", len(losses)) or "-"),
               fmt(losses[-1] if losses else None), fmt(margins[-1] if margins else None),
               fmt(run.heldout("before")), fmt(run.heldout("after")),
               fmt(run.answers("before")), fmt(run.answers("after"))]
        if critic:
            _, ev = run.series("critic/explained_variance")
            tail = sorted(ev[-max(1, len(ev) // 3):])
            row.append(fmt(tail[len(tail) // 2] if ev else None))  # the median: robust to steps with flat returns
        marks = run.benchmarks()
        row += [f"{fmt(marks.get(key, (None, None))[0])} -> {fmt(marks.get(key, (None, None))[1])}" for key in bench]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def figure(runs: list[Run]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extras = [(key, title) for key, title in EXTRA_PANELS if any(run.series(key)[0] for run in runs)]
    panels = [*PANELS, *extras]
    rows = (len(panels) + 1) // 2
    fig, grid = plt.subplots(rows, 2, figsize=(12, 4 * rows), squeeze=False)
    flat = [ax for row in grid for ax in row]
    for ax in flat[len(panels):]:
        fig.delaxes(ax)
    axes = dict(zip((key for key, _ in panels), flat, strict=False))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for key in ("loss", "rewards/margins", *(k for k, _ in extras)):
            steps, values = run.series(key)
            axes[key].plot(steps, values, color=color, label=run.label)
        steps, chosen = run.series("logps/chosen")
        axes["logps"].plot(steps, chosen, color=color, label=run.label)
        steps, rejected = run.series("logps/rejected")
        axes["logps"].plot(steps, rejected, color=color, linestyle="--")
        before, after = run.heldout("before"), run.heldout("after")
        axes["heldout"].plot([0, 1], [before if before is not None else float("nan"),
                                      after if after is not None else float("nan")],
                             color=color, marker="o", label=run.label)
    from matplotlib.ticker import MaxNLocator

    for key, title in panels:
        ax = axes[key]
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key != "heldout":
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes["heldout"].set_xticks([0, 1], ["before", "after"])
    axes["heldout"].set_ylim(0, 1)
    if "critic/explained_variance" in axes:
        low, high = axes["critic/explained_variance"].get_ylim()
        axes["critic/explained_variance"].set_ylim(max(low, -1.0), max(high, 1.0))  # EV far below -1 says "worse"
    axes["loss"].legend(fontsize=8)
    fig.tight_layout()
    return fig


def compare(paths: list[str], output: str, overwrite: bool = False) -> tuple[list[Run], Path]:
    if not paths:
        raise UserError("no run directories given", field="RUN_DIR", fix="posttrain compare runs/a runs/b ...")
    out = Path(output)
    if out.exists() and not overwrite:
        raise UserError(f"'{out}' already exists", field="--output", fix="choose another --output or pass --overwrite")
    if out.suffix.lower() != ".png":
        raise UserError(f"'{out}' is not a .png file name", field="--output", fix="use a name ending in .png")
    runs = [run for p in paths for run in load_runs(p)]
    fig = figure(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return runs, out
