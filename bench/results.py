"""posttrain's measured results: one record per run or table row in docs/results/*.json, and the page
made from them, docs/results.md.

    python bench/results.py add RUN_DIR_OR_BENCH_JSON [--command CMD] [--machine TEXT] [--name NAME]
                                [--group GROUP] [--records DIR]
    python bench/results.py render [--records DIR] [--out FILE] [--check]      (make results)

``add`` reads a run's own ``summary.json`` (a stage's or a pipeline's; give the run folder or the file)
or a JSON report of a benchmark script (bench/overhead.py and bench/online.py print theirs: save it
with ``> FILE.json``; bench/gpu.py --out, bench/saferlhf_table.py's table.json, bench/ood.py's ood.json,
bench/critic_fit.py's critic_fit.json) and writes a record for it (several for a table) into
docs/results/. The commit is ``git rev-parse --short HEAD``, the machine this one's platform and CPU
count (bench/gpu.py's report names its device), the date the file's, the command ``--command`` or
one rebuilt from what the file says (``posttrain run RECIPE --output-dir RUN_DIR``, a bench
script with the options its report records). ``render`` writes docs/results.md from every record,
one table per subject; ``--check`` only says whether the page is up to date (exit 1 if not).

A record is a JSON object with these keys (``notes`` optional, nothing else):

    group    one of GROUPS' keys below (the subject: quick-start, online-rl, ...)
    name     the recipe or benchmark, and what distinguishes this row (a seed, a setting)
    metrics  a list of {"name": ..., "value": ...}; a value is a number, a string (kept as written:
             transcribed figures keep the docs' own digits) or a list [before, after] (or a longer
             sequence: rounds, thirds), shown as "a → b"
    machine  where it ran, as stated ("Linux x86_64, 2 CPU cores", "one H100 80GB")
    commit   the checkout's commit when it was added (for a transcribed record: the commit that first
             stated it in the docs)
    command  the command that produced it
    date     YYYY-MM-DD
    source   where the numbers come from (a run folder's file, or "transcribed from <file> at commit
             <sha>; the run folder was not kept")

Only the standard library: no torch, nothing of posttrain's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECORDS = REPO / "docs" / "results"
PAGE = REPO / "docs" / "results.md"

# subject key -> heading of its table on the page, in the page's order
GROUPS = {
    "quick-start": "Quick start",
    "online-rl": "Online RL",
    "pipelines": "Pipelines",
    "saferlhf": "SafeRLHF table in miniature",
    "ood": "Out-of-distribution effect: DPO beside reward model + PPO",
    "bench-trl": "Benchmarks against plain TRL",
    "gpu": "GPU figures",
}
REQUIRED = ("group", "name", "metrics", "machine", "commit", "command", "date", "source")
OPTIONAL = ("notes",)


class RecordError(Exception):
    """A record that cannot be read, or a file ``add`` cannot make one from."""


# -- records ---------------------------------------------------------------------------------------


def check(record, where: str) -> dict:
    """The record itself when it is well formed; else a RecordError naming the file and what is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record is a JSON object, not {type(record).__name__}")
    missing = [key for key in REQUIRED if key not in record or record[key] in (None, "", [])]
    if missing:
        raise RecordError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(repr(k) for k in missing)}; every record needs {', '.join(REQUIRED)}")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise RecordError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(k) for k in unknown)}; a record has {', '.join(REQUIRED + OPTIONAL)}")
    if record["group"] not in GROUPS:
        raise RecordError(f"{where}: group {record['group']!r} is not one of {', '.join(GROUPS)}")
    for key in ("name", "machine", "commit", "command", "date", "source"):
        if not isinstance(record[key], str):
            raise RecordError(f"{where}: field {key!r} must be a string")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"]):
        raise RecordError(f"{where}: date {record['date']!r} is not YYYY-MM-DD")
    if not isinstance(record["metrics"], list):
        raise RecordError(f"{where}: 'metrics' must be a list of {{\"name\": ..., \"value\": ...}}")
    for i, metric in enumerate(record["metrics"]):
        if not isinstance(metric, dict) or set(metric) != {"name", "value"} or not isinstance(metric["name"], str):
            raise RecordError(f"{where}: metrics[{i}] must be {{\"name\": TEXT, \"value\": ...}}, got {metric!r}")
        value = metric["value"]
        parts = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) < 2 or not all(
                v is None or isinstance(v, (int, float, str)) for v in parts):
            raise RecordError(f"{where}: metrics[{i}] ({metric['name']}): a value is a number, a string or a list "
                              f"of two or more of them, got {value!r}")
    return record


def load_records(folder: Path = RECORDS) -> list[tuple[Path, dict]]:
    """Every record in ``folder``, checked, in file-name order."""
    if not folder.is_dir():
        raise RecordError(f"{folder}: no such folder of records")
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: not JSON ({e})") from e
        out.append((path, check(record, str(path))))
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "record"


def write_record(record: dict, folder: Path) -> Path:
    """Write a checked record as ``<name>--<date>.json`` (a suffix when taken); the same name from the same
    source twice is refused."""
    check(record, f"the record for {record.get('name')!r}")
    folder.mkdir(parents=True, exist_ok=True)
    for path, other in load_records(folder):
        if other["name"] == record["name"] and other["source"] == record["source"]:
            raise RecordError(f"{path} already records {record['name']!r} from {record['source']}; "
                              "remove it to record again")
    stem = f"{slug(record['name'])}--{record['date']}"
    path, n = folder / f"{stem}.json", 2
    while path.exists():
        path, n = folder / f"{stem}-{n}.json", n + 1
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# -- add: what a run or a benchmark wrote ------------------------------------------------------------


def this_machine() -> str:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    return f"{platform.system()} {platform.machine()}, {cores} CPU cores"


def head_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise RecordError(f"cannot read the commit (git rev-parse --short HEAD in {REPO}): {e}") from e
    return out.stdout.strip()


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def stage_metrics(summary: dict, prefix: str = "") -> list[dict]:
    """A stage's numbers from its summary (a stage's summary.json, or a stage's entry in a pipeline's):
    steps, held-out examples, every held-out and greedy-answer number before → after, the online
    stage's training reward (first → last third), its time."""
    out = []

    def add(name, value):
        if value is not None and (not isinstance(value, list) or any(v is not None for v in value)):
            out.append({"name": prefix + name, "value": value})

    add("steps", summary.get("global_step"))
    if _num(summary.get("heldout_examples")) and summary["heldout_examples"]:
        add("held-out examples", summary["heldout_examples"])
    for group, label in (("heldout", "held-out"), ("answers", "greedy")):
        before = (summary.get("before") or {}).get(group) or {}
        after = (summary.get("after") or {}).get(group) or {}
        keys = [*before, *(k for k in after if k not in before)]
        for key in keys:
            b, a = before.get(key), after.get(key)
            if key in ("n", "examples") or not (_num(b) or _num(a)):
                continue
            add(f"{label} {key.replace('_', ' ')}", [b if _num(b) else None, a if _num(a) else None])
        sources = sorted(set((before.get("by_source") or {})) | set((after.get("by_source") or {})))
        if len(sources) > 1:  # with one source, its mean is the mean reward above
            for source in sources:
                add(f"greedy mean reward of {source}", [(before.get("by_source") or {}).get(source),
                                                         (after.get("by_source") or {}).get(source)])
    if summary.get("reward_first_third") is not None or summary.get("reward_last_third") is not None:
        add("training reward, first → last third", [summary.get("reward_first_third"),
                                                    summary.get("reward_last_third")])
    add("training time (s)", summary.get("train_seconds_this_session"))
    add("time (s)", summary.get("seconds"))
    return out


def from_stage_summary(data: dict, where: Path) -> list[dict]:
    recipe = data["recipe"]
    group = ("saferlhf" if recipe.startswith("saferlhf") else "online-rl" if data.get("stage") == "online"
             else "quick-start")
    run_dir = where.parent
    return [{"group": group, "name": recipe, "metrics": stage_metrics(data),
             "command": f"posttrain run {recipe} --output-dir {run_dir}"}]


def from_pipeline_summary(data: dict, where: Path) -> list[dict]:
    metrics = []
    for stage in data["stages"]:
        metrics += stage_metrics(stage, prefix=f"{stage.get('name')}: ")
    if _num(data.get("seconds_this_session")):
        metrics.append({"name": "total time (s)", "value": data["seconds_this_session"]})
    name = data["pipeline"]
    return [{"group": "saferlhf" if name.startswith("saferlhf") else "pipelines", "name": name, "metrics": metrics,
             "command": f"posttrain run {name} --output-dir {where.parent}"}]


def _bench_command(script: str, data: dict, *flags: str) -> str:
    parts = [f"python {script}", *flags]
    for key, flag in (("steps", "--steps"), ("repeats", "--repeats")):
        if _num(data.get(key)):
            parts.append(f"{flag} {data[key]}")
    if data.get("lora"):
        parts.append("--lora")
    return " ".join(parts)


def from_trl_comparison(data: dict, where: Path) -> list[dict]:
    """bench/overhead.py (DPO) or bench/online.py (GRPO): posttrain against plain TRL."""
    script = "bench/online.py" if "trl_rewards" in data else "bench/overhead.py"
    metrics = [{"name": "step-time ratio (posttrain / TRL)", "value": data["step_time_ratio"]},
               {"name": "posttrain median step (s)", "value": data["posttrain_median_step_s"]},
               {"name": "TRL median step (s)", "value": data["trl_median_step_s"]}]
    if "max_abs_reward_difference" in data:
        metrics.append({"name": "largest reward difference", "value": data["max_abs_reward_difference"]})
    metrics += [{"name": "largest loss difference", "value": data["max_abs_loss_difference"]},
                {"name": "model parameters", "value": data["model_parameters"]},
                {"name": "torch threads", "value": data["torch_threads"]}]
    return [{"group": "bench-trl", "name": script + (" --lora" if data.get("lora") else ""), "metrics": metrics,
             "command": _bench_command(script, data)}]


def from_ppo_comparison(data: dict, where: Path) -> list[dict]:
    """bench/online.py --ppo: PPO with a critic against GRPO, both through posttrain."""
    metrics = [{"name": "step-time ratio (PPO / GRPO)", "value": data["ppo_to_grpo_step_time_ratio"]},
               {"name": "PPO median step (s)", "value": data["ppo_median_step_s"]},
               {"name": "GRPO median step (s)", "value": data["grpo_median_step_s"]},
               {"name": "prompts per step", "value": data["prompts_per_step"]},
               {"name": "model parameters", "value": data["model_parameters"]},
               {"name": "torch threads", "value": data["torch_threads"]}]
    return [{"group": "bench-trl", "name": "bench/online.py --ppo", "metrics": metrics,
             "command": _bench_command("bench/online.py", data, "--ppo")}]


def from_gpu_report(data: dict, where: Path) -> list[dict]:
    """bench/gpu.py: one record per workload."""
    settings = data.get("settings") or {}
    out = []
    for key, w in (data.get("workloads") or {}).items():
        if "skipped" in w or "error" in w:
            metrics = [{"name": "skipped" if "skipped" in w else "error", "value": w.get("skipped") or w["error"]}]
        else:
            pairs = (("step-time ratio (posttrain / TRL)", "step_time_ratio"),
                     ("posttrain median step (s)", "posttrain_median_step_s"),
                     ("TRL median step (s)", "trl_median_step_s"),
                     ("posttrain tokens/s", "posttrain_tokens_per_s"), ("TRL tokens/s", "trl_tokens_per_s"),
                     ("posttrain MFU", "posttrain_mfu"), ("TRL MFU", "trl_mfu"),
                     ("posttrain peak memory (GiB)", "posttrain_peak_memory_gib"),
                     ("TRL peak memory (GiB)", "trl_peak_memory_gib"),
                     ("posttrain generation share", "posttrain_generation_share"),
                     ("TRL generation share", "trl_generation_share"),
                     ("posttrain generated tokens/s", "posttrain_generated_tokens_per_s"),
                     ("TRL generated tokens/s", "trl_generated_tokens_per_s"),
                     ("largest loss difference", "max_abs_loss_difference"))
            metrics = [{"name": name, "value": w[field]} for name, field in pairs if w.get(field) is not None]
        flags = ["--smoke"] if settings.get("smoke") else []
        out.append({"group": "gpu", "name": f"bench/gpu.py {key}", "metrics": metrics,
                    "machine": data.get("device") or None,
                    "command": " ".join(["python bench/gpu.py", *flags, f"--only {w.get('workload', key)}",
                                         f"--liger {'on' if w.get('liger') else 'off'}"])})
    return out


def from_saferlhf_table(data: dict, where: Path) -> list[dict]:
    """bench/saferlhf_table.py's table.json: one record per row (and seed)."""
    out = []
    seeds = data.get("seeds")
    command = f"python bench/saferlhf_table.py --out {where.parent}" + (
        f" --seeds {','.join(str(s) for s in seeds)}" if seeds else "")
    for line in data["table"]:
        metrics = [{"name": label, "value": f"{100 * line[key]:.1f}%"}
                   for label, key in (("safety rate", "safety_rate"), ("helpfulness", "helpfulness"),
                                      ("benign answered", "benign_answered"), ("harmful refused", "harmful_refused"))
                   if _num(line.get(key))]
        name = line["row"] + ("" if line.get("seed") is None else f" (seed {line['seed']})")
        out.append({"group": "saferlhf", "name": name, "metrics": metrics, "command": command})
    return out


def from_ood(data: dict, where: Path) -> list[dict]:
    """bench/ood.py's ood.json: the start and each method's last checkpoint, mean ± sd over the seeds."""
    summary = data["summary"]
    seeds = ",".join(str(s) for s in data["seeds"])
    labels = {"dpo.start": "start (SFT on y1, y2, y3)", "dpo.end": "DPO, last checkpoint",
              "ppo.end": "reward model + PPO, last checkpoint"}
    out = []
    for key, label in labels.items():
        metrics = []
        for answer, name in (("y1", "P(y1)"), ("y2", "P(y2)"), ("y3", "P(y3), unseen"),
                             ("other", "P(anything else)")):
            v = summary[key][answer]
            metrics.append({"name": name, "value": f"{v['mean']:.3f} ± {v['sd']:.3f}"})
        out.append({"group": "ood", "name": f"bench/ood.py, {label} (seeds {seeds})", "metrics": metrics,
                    "command": f"python bench/ood.py --out {where.parent} --seeds {seeds}"})
    return out


def from_critic_fit(data: dict, where: Path) -> list[dict]:
    """bench/critic_fit.py's critic_fit.json: one record per critic learning rate."""
    out = []
    sets = "".join(f" --set {s}" for s in data.get("set") or [])
    lrs = ",".join(f"{row['learning_rate']:g}" for row in data["rows"])
    for row in data["rows"]:
        pairs = (("explained variance", "explained_variance"), ("at the last token", "explained_variance_last"),
                 ("value loss", "value_loss"), ("mean value", "values_mean"), ("mean return", "returns_mean"),
                 ("updates", "steps"))
        out.append({"group": "online-rl", "name": f"bench/critic_fit.py, critic lr {row['learning_rate']:g}",
                    "metrics": [{"name": name, "value": row[key]} for name, key in pairs if row.get(key) is not None],
                    "command": f"python bench/critic_fit.py --recipe {data['recipe']} --lrs {lrs}{sets}"})
    return out


def records_from(path: Path) -> tuple[Path, list[dict]]:
    """The file read and the partial records (group, name, metrics, command; maybe machine) it gives."""
    if path.is_dir():
        path = path / "summary.json"
        if not path.is_file():
            raise RecordError(f"{path.parent}: no summary.json (a run folder has one once its run finished)")
    if not path.is_file():
        raise RecordError(f"{path}: no such file or folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise RecordError(f"{path}: not a summary.json or a benchmark's JSON report (not an object)")
    readers = (
        (lambda d: "pipeline" in d and "stages" in d, from_pipeline_summary),
        (lambda d: "recipe" in d and "stage" in d, from_stage_summary),
        (lambda d: "ppo_to_grpo_step_time_ratio" in d, from_ppo_comparison),
        (lambda d: "step_time_ratio" in d and "trl_median_step_s" in d, from_trl_comparison),
        (lambda d: str(d.get("benchmark", "")).startswith("bench/gpu.py"), from_gpu_report),
        (lambda d: isinstance(d.get("table"), list) and "heldout" in d, from_saferlhf_table),
        (lambda d: "summary" in d and "seeds" in d and "groups" in d, from_ood),
        (lambda d: isinstance(d.get("rows"), list) and "recipe" in d, from_critic_fit),
    )
    for matches, read in readers:
        if matches(data):
            try:
                return path, read(data, path)
            except (KeyError, TypeError) as e:
                raise RecordError(f"{path}: looks like the input of {read.__name__} but lacks {e}") from e
    raise RecordError(f"{path}: neither a run's summary.json nor a JSON report of bench/overhead.py, online.py, "
                      "gpu.py, saferlhf_table.py, ood.py or critic_fit.py")


def add(target: str, *, command: str | None = None, machine: str | None = None, name: str | None = None,
        group: str | None = None, records: Path = RECORDS) -> list[Path]:
    """Write the records of a run folder or a benchmark's JSON into ``records``; returns their paths."""
    path, partial = records_from(Path(target))
    if name and len(partial) > 1:
        raise RecordError(f"{path} gives {len(partial)} records: --name names one")
    if group and group not in GROUPS:
        raise RecordError(f"--group {group!r} is not one of {', '.join(GROUPS)}")
    try:
        shown = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = path
    date = datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
    commit = head_commit()
    written = []
    records = Path(records)
    full = []
    for record in partial:
        full.append(check({
            "group": group or record["group"],
            "name": name or record["name"],
            "metrics": record["metrics"],
            "machine": machine or record.get("machine") or this_machine(),
            "commit": commit,
            "command": command or record["command"],
            "date": date,
            "source": f"{shown} (bench/results.py add)",
        }, f"the record for {record['name']!r} from {path}"))
    for record in full:  # every record checked before the first is written
        written.append(write_record(record, records))
    return written


# -- render ------------------------------------------------------------------------------------------


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return " → ".join(fmt(v) for v in value)
    if isinstance(value, bool) or isinstance(value, int) or isinstance(value, str):
        return str(value)
    if value != 0 and abs(value) < 0.001:
        return f"{value:.1e}"
    if abs(value) < 10:
        return f"{value:.3f}"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def command_cell(command: str) -> str:
    """A command as code; "not stated ..." (a transcribed figure whose command the docs never gave) as text."""
    return cell(command) if command.startswith("not stated") else f"`{cell(command)}`"


HEADER = """# Measured results

<!-- Made by `python bench/results.py render` (`make results`) from docs/results/*.json: edit the records,
not this page; tests/test_results_page.py fails when the two differ. -->

The measured runs behind the numbers in the README and docs/, one record per run or table row in
[results/](results/), rendered here by `python bench/results.py render` (`make results`). A new run's record:
`python bench/results.py add RUN_DIR` (a run's `summary.json`) or `add REPORT.json` (a
benchmark's report), then `make results`.

Columns: **machine** as the run stated it; **commit** the checkout's commit when the record was
added (`git rev-parse --short HEAD`: add a run from the checkout that ran it), or, for a record
transcribed from the docs whose run folder was not kept, the commit that first stated the number;
**command** what produced it. A value `a → b` is before → after (or first → last third, or
rounds in order). Sources and notes are listed under each table. These are single runs on small
models unless a row says otherwise: read them as what happened here, not as a method's ranking.
"""


def render_text(folder: Path = RECORDS) -> str:
    records = load_records(folder)
    by_group: dict[str, list[dict]] = {key: [] for key in GROUPS}
    for _, record in records:
        by_group[record["group"]].append(record)
    parts = [HEADER]
    parts.append("Subjects: " + ", ".join(f"[{title}](#{anchor(title)}) ({len(by_group[key])})"
                                          for key, title in GROUPS.items() if by_group[key]) + ".\n")
    for key, title in GROUPS.items():
        group = by_group[key]
        if not group:
            continue
        lines = [f"## {title}", "", "| recipe / bench | metric | value | machine | commit | command |",
                 "|---|---|---|---|---|---|"]
        for record in group:
            for i, metric in enumerate(record["metrics"]):
                first = i == 0
                lines.append("| " + " | ".join([
                    cell(record["name"]) if first else "",
                    cell(metric["name"]),
                    cell(fmt(metric["value"])),
                    cell(record["machine"]) if first else "",
                    cell(record["commit"]) if first else "",
                    command_cell(record["command"]) if first else "",
                ]) + " |")
        lines += ["", "Sources:", ""]
        for record in group:
            note = f" {record['notes']}" if record.get("notes") else ""
            lines.append(f"- **{record['name']}** ({record['date']}): {record['source']}.{note}")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


# -- command line ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("add", help="record a run (its folder or summary.json) or a benchmark's JSON report")
    p.add_argument("target", metavar="RUN_DIR_OR_BENCH_JSON")
    p.add_argument("--command", dest="run_command", help="the command that produced it (default: rebuilt)")
    p.add_argument("--machine", help=f"where it ran (default: this machine, '{this_machine()}')")
    p.add_argument("--name", help="the record's name (default: the recipe or benchmark)")
    p.add_argument("--group", choices=list(GROUPS), help="the subject (default: from the recipe or benchmark)")
    p.add_argument("--records", default=str(RECORDS), help="the folder of records (default docs/results)")
    p = sub.add_parser("render", help="write docs/results.md from the records")
    p.add_argument("--records", default=str(RECORDS), help="the folder of records (default docs/results)")
    p.add_argument("--out", default=str(PAGE), help="the page to write (default docs/results.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page is not up to date")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            for path in add(args.target, command=args.run_command, machine=args.machine, name=args.name,
                            group=args.group, records=Path(args.records)):
                print(f"wrote {path}")
            return 0
        text = render_text(Path(args.records))
        out = Path(args.out)
        if args.check:
            if not out.is_file() or out.read_text(encoding="utf-8") != text:
                print(f"{out} is not up to date: run `python bench/results.py render` (make results)",
                      file=sys.stderr)
                return 1
            return 0
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
        return 0
    except RecordError as e:
        print(f"bench/results.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
