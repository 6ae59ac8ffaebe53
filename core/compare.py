"""``posttrain compare``: runs side by side, as a table and a figure, each stage with its own metrics.

Reads each run directory's ``metrics.jsonl`` and ``summary.json`` (no torch import). A pipeline
directory is its stages in order on one step axis; an iterative stage's rounds follow one another on it
too (round boundaries are drawn). Each stage declares the panels it is drawn in (``Stage.panels``:
curves of logged metrics, held-out numbers before and after, per-round numbers); a panel belongs to
one stage kind and one metric, so numbers of different scales never share an axis. The figure lays
out the panels the compared runs need, one colour per run (a pipeline's stages share their run's
colour). The table has one row per run, stage and number: every held-out number before and after
(preference and pairwise accuracy, NLL, answer accuracy, mean reward, lm-eval's results), an online
stage's training reward, an iterative stage's rounds, rejection sampling's counts.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .stage import ANSWER_PANEL, Panel


@dataclass
class Run:
    """One stage of one run: its folder, logged metrics and summary, where it sits on its run's step axis."""

    label: str  # the run's label (a pipeline's stages share it)
    stage_name: str  # the stage's folder in a pipeline (01-sft), else its kind
    kind: str  # the stage kind (sft, preference, ...)
    path: Path
    metrics: list[dict]
    summary: dict
    offset: int = 0  # steps of the stages before it in its pipeline
    group: int = 0  # which compared run it belongs to (its colour)
    round_offsets: dict = field(default_factory=dict)  # iterative: round -> steps of the rounds before it

    @property
    def steps(self) -> int:
        return int(self.summary.get("global_step") or max((m.get("step", 0) for m in self.metrics), default=0))

    def x(self, line: dict) -> int:
        return self.offset + self.round_offsets.get(line.get("round"), 0) + int(line.get("step", 0))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(self.x(m), m[key]) for m in self.metrics
                  if isinstance(m.get(key), (int, float)) and "eval_loss" not in m]
        return [p[0] for p in points], [p[1] for p in points]

    def keys(self) -> set:
        return {k for m in self.metrics for k, v in m.items() if isinstance(v, (int, float))}

    def heldout(self, when: str, key: str = "preference_accuracy", group: str = "heldout"):
        return ((self.summary.get(when) or {}).get(group) or {}).get(key)

    def answers(self, when: str):
        return self.heldout(when, "answer_accuracy", "answers")

    def benchmarks(self) -> dict:
        """{task/metric: (before, after)} of lm-eval: the summary's records, else the run's eval.json."""
        from .benchmarks import headline

        records = dict(self.summary.get("lm_eval") or {})
        if "after" not in records and (self.path / "eval.json").is_file():
            records["after"] = json.loads((self.path / "eval.json").read_text(encoding="utf-8"))
        before, after = headline(records.get("before") or {}), headline(records.get("after") or {})
        return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))}

    def rounds(self) -> list[dict]:
        return list(self.summary.get("rounds") or [])


def _get(record: dict, path: str):
    for part in path.split("."):
        record = (record or {}).get(part) if isinstance(record, dict) else None
    return record


def pipeline_stages(path: Path) -> list[Path]:
    """The stage run directories of a pipeline directory (``01-sft``, ``02-dpo``...), in order."""
    return sorted(p for p in path.iterdir() if p.is_dir() and p.name[:2].isdigit() and p.name[2:3] == "-"
                  and (p / "summary.json").is_file()) if path.is_dir() else []


def load_runs(path: str | Path, group: int = 0) -> list[Run]:
    """A run directory, or every stage of a pipeline directory (one after another on the step axis)."""
    path = Path(path)
    if not (path / "metrics.jsonl").is_file() and pipeline_stages(path):
        runs, offset = [], 0
        for stage in pipeline_stages(path):
            run = load_run(stage, label=path.name, stage_name=stage.name, group=group)
            run.offset = offset
            offset += run.steps
            runs.append(run)
        return runs
    return [load_run(path, group=group)]


def load_run(path: str | Path, label: str | None = None, stage_name: str | None = None, group: int = 0) -> Run:
    path = Path(path)
    summary_file, metrics_file = path / "summary.json", path / "metrics.jsonl"
    if not metrics_file.is_file() and not summary_file.is_file():
        raise UserError(f"'{path}' is not a run directory (no metrics.jsonl or summary.json) or a pipeline directory",
                        field="RUN_DIR", fix="give directories written by `posttrain run`")
    metrics = ([json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
               if metrics_file.is_file() else [])
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    kind = summary.get("stage") or "preference"
    run = Run(label or path.name, stage_name or kind, kind, path, metrics, summary, group=group)
    offset = 0
    for record in run.rounds():  # an iterative stage: each round's steps start again at 1
        run.round_offsets[record.get("round")] = offset
        offset += int(record.get("global_step") or 0)
    return run


# -- what to draw ----------------------------------------------------------------------------------


@dataclass
class Drawn:
    """A panel as drawn: its stage kind, the panel, and (for a split panel) the one key it shows."""

    kind: str
    panel: Panel
    key: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.panel.name}" + (f"/{self.key}" if self.key else "")

    @property
    def title(self) -> str:
        return f"{self.kind}: " + self.panel.title.format(key=self.key.split("/")[1] if self.key else "")


def _panels_of(kind: str) -> tuple:
    from .stages import STAGES

    stage = STAGES.get(kind)
    return (*(stage.panels if stage is not None else ()), ANSWER_PANEL)


def _has_data(panel: Panel, run: Run, key: str | None = None) -> bool:
    if panel.kind == "curve":
        keys = [key] if key else list(panel.keys)
        return any(run.series(k)[0] for k in keys)
    if panel.kind == "heldout":
        return any(run.heldout(w, panel.keys[1], panel.keys[0]) is not None for w in ("before", "after"))
    if panel.kind == "rounds":
        return any(isinstance(_get(r, panel.keys[0]), (int, float)) for r in run.rounds())
    return isinstance(_get(run.summary, panel.keys[0]), (int, float))


def panels_for(runs: list[Run], wanted: list[str] | None = None) -> list[Drawn]:
    """The panels the runs need, in the stages' order of declaration, kinds in the order the runs come."""
    out: list[Drawn] = []
    kinds = list(dict.fromkeys(run.kind for run in runs))
    for kind in kinds:
        of_kind = [run for run in runs if run.kind == kind]
        for panel in _panels_of(kind):
            if panel.split:
                keys = sorted({k for run in of_kind for k in run.keys() if fnmatch.fnmatch(k, panel.keys[0])})
                out += [Drawn(kind, panel, k) for k in keys if any(_has_data(panel, r, k) for r in of_kind)]
            elif any(_has_data(panel, run) for run in of_kind):
                out.append(Drawn(kind, panel))
    if wanted:
        unknown = [w for w in wanted if not any(w in (d.name, d.panel.name, d.kind) for d in out)]
        if unknown:
            raise UserError(f"no panel called {unknown[0]!r} for these runs", field="--metrics",
                            fix="panels: " + ", ".join(d.name for d in out))
        out = [d for d in out if any(w in (d.name, d.panel.name, d.kind) for w in wanted)]
    return out


def _draw(ax, drawn: Drawn, run: Run, color) -> None:
    panel = drawn.panel
    label = run.label if run.offset == 0 else None
    if panel.kind == "curve":
        keys = [drawn.key] if drawn.key else list(panel.keys)
        for i, key in enumerate(keys):
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, color=color, linestyle="--" if i else "-", label=label if i == 0 else None)
        for r, offset in run.round_offsets.items():  # an iterative stage's round boundaries
            if offset:
                ax.axvline(run.offset + offset, color=color, alpha=0.3, linestyle=":")
    elif panel.kind == "heldout":
        group, key = panel.keys
        before, after = run.heldout("before", key, group), run.heldout("after", key, group)
        xs = [run.offset, run.offset + run.steps]
        ys = [before if before is not None else float("nan"), after if after is not None else float("nan")]
        ax.plot(xs, ys, color=color, marker="o", label=label)
    elif panel.kind == "rounds":
        xs, ys = [], []
        for record in run.rounds():
            value = _get(record, panel.keys[0])
            if isinstance(value, (int, float)):
                xs.append(run.x({"round": record.get("round"), "step": record.get("global_step", 0)}))
                ys.append(value)
        ax.plot(xs, ys, color=color, marker="o", label=label)
    else:
        value = _get(run.summary, panel.keys[0])
        ax.plot([run.offset + run.steps], [value], color=color, marker="s", label=label)


def figure(runs: list[Run], wanted: list[str] | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    drawn = panels_for(runs, wanted)
    if not drawn:
        raise UserError("the runs have nothing to draw (no logged metric or held-out number)", field="RUN_DIR",
                        fix="compare finished runs")
    cols = 2 if len(drawn) <= 4 else 3
    rows = (len(drawn) + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False)
    flat = [ax for row in grid for ax in row]
    for ax in flat[len(drawn):]:
        fig.delaxes(ax)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, d in zip(flat, drawn, strict=False):
        for run in runs:
            if run.kind == d.kind:
                _draw(ax, d, run, colors[run.group % len(colors)])
        ax.set_title(d.title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if d.panel.name in ("explained_variance",):
            low, high = ax.get_ylim()
            ax.set_ylim(max(low, -1.0), max(high, 1.0))  # EV far below -1 says "worse", which is enough
        if "accuracy" in d.panel.name:
            ax.set_ylim(-0.02, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# -- the table -------------------------------------------------------------------------------------


def rows(runs: list[Run]) -> list[dict]:
    """One row per run, stage and number: before and after (or per round)."""
    out = []

    def add(run, metric, before, after):
        if before is None and after is None:
            return
        out.append({"run": run.label, "stage": run.stage_name, "kind": run.kind, "steps": run.steps,
                    "metric": metric, "before": before, "after": after})

    for run in runs:
        for group in ("heldout", "answers"):
            keys = set(((run.summary.get("before") or {}).get(group) or {})) | \
                set(((run.summary.get("after") or {}).get(group) or {}))
            for key in sorted(keys):
                b, a = run.heldout("before", key, group), run.heldout("after", key, group)
                if isinstance(b, dict) or isinstance(a, dict):  # answers' by_source: each reward source's mean
                    b, a = b if isinstance(b, dict) else {}, a if isinstance(a, dict) else {}
                    for name in sorted(set(b) | set(a)):
                        add(run, f"answers {name} (mean reward)", b.get(name), a.get(name))
                    continue
                if isinstance(b, (int, float)) or isinstance(a, (int, float)):
                    add(run, f"{'held-out' if group == 'heldout' else 'answers'} {key}",
                        b if isinstance(b, (int, float)) else None, a if isinstance(a, (int, float)) else None)
        if run.summary.get("reward_first_third") is not None:
            add(run, "training reward (first -> last third)", run.summary.get("reward_first_third"),
                run.summary.get("reward_last_third"))
        for record in run.rounds():
            add(run, f"round {record.get('round')} answer accuracy", None, _get(record, "answers.answer_accuracy"))
            add(run, f"round {record.get('round')} pairs", None, record.get("pairs"))
        if run.kind == "rejection_sampling":
            add(run, "prompts kept", None, run.summary.get("kept"))
            add(run, "best sample reward (mean)", None, _get(run.summary, "best_rewards.mean"))
        for key, (b, a) in run.benchmarks().items():
            add(run, f"lm-eval {key}", b, a)
        if not any(r["run"] == run.label and r["stage"] == run.stage_name for r in out):
            add(run, "final training loss", None, next((m["loss"] for m in reversed(run.metrics)
                                                         if isinstance(m.get("loss"), (int, float))), None))
    return out


def table(runs: list[Run]) -> str:
    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    header = ["run", "stage", "steps", "metric", "before", "after"]
    body = [[r["run"], r["stage"], str(r["steps"]), r["metric"], fmt(r["before"]), fmt(r["after"])] for r in rows(runs)]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body]
    return "\n".join(lines)


def table_csv(runs: list[Run]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["run", "stage", "kind", "steps", "metric", "before", "after"])
    writer.writeheader()
    writer.writerows(rows(runs))
    return buffer.getvalue()


def _html(runs: list[Run], fig) -> str:
    import base64
    import html

    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    data = base64.b64encode(png.getvalue()).decode("ascii")
    cells = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>"
                                     for v in (r["run"], r["stage"], r["steps"], r["metric"],
                                               None if r["before"] is None else f"{r['before']:.4g}",
                                               None if r["after"] is None else f"{r['after']:.4g}")) + "</tr>"
                    for r in rows(runs))
    return ("<!doctype html><meta charset='utf-8'><title>posttrain compare</title>"
            "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}</style>"
            "<h1>posttrain compare</h1><table><tr><th>run</th><th>stage</th><th>steps</th><th>metric</th>"
            f"<th>before</th><th>after</th></tr>{cells}</table><img src='data:image/png;base64,{data}'>")


OUTPUTS = (".png", ".html", ".csv")


def compare(paths: list[str], output: str, overwrite: bool = False, metrics: list[str] | None = None
            ) -> tuple[list[Run], Path]:
    if not paths:
        raise UserError("no run directories given", field="RUN_DIR", fix="posttrain compare runs/a runs/b ...")
    out = Path(output)
    if out.exists() and not overwrite:
        raise UserError(f"'{out}' already exists", field="--output", fix="choose another --output or pass --overwrite")
    if out.suffix.lower() not in OUTPUTS:
        raise UserError(f"'{out}' is not a .png, .html or .csv file name", field="--output",
                        fix="end the name in .png (the figure), .html (table and figure) or .csv (the table)")
    runs = [run for i, p in enumerate(paths) for run in load_runs(p, group=i)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        out.write_text(table_csv(runs), encoding="utf-8")
        return runs, out
    fig = figure(runs, metrics)
    if out.suffix.lower() == ".html":
        out.write_text(_html(runs, fig), encoding="utf-8")
    else:
        fig.savefig(out, dpi=100)
    return runs, out
