"""A reproducibility check in one command: every (script, environment or dataset, seed) through the script's own
command line, then one table per environment with confidence intervals, published numbers beside ours, and a
learning-curve picture.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/reproduce.py --scripts sac_continuous.py td3_continuous.py --env-ids Hopper-v5 HalfCheetah-v5 \
        --seeds 1 2 3 --total-timesteps 100000 --workers 2 --output-dir benchmarks/results/NAME
    python benchmarks/reproduce.py --scripts decision_transformer.py --datasets data/replay.npz --seeds 1 2 3 \
        --total-timesteps 8000 --output-dir benchmarks/results/dt -- --batch-size 32 --eval-episodes 10

Everything after `--` goes to every script. Each run gets its own folder, OUTPUT/jobs/SCRIPT/TASK/seedN/, where it
runs (so its TensorBoard logs land in OUTPUT/jobs/SCRIPT/TASK/seedN/runs/) and writes `log.txt`; a finished run
copies its evaluations from its TensorBoard logs into `evaluations.csv` there (text, so results can be committed
without the binary event files) and writes `done.json`. Every run gets `--save-model`, so it writes checkpoints
(SCRIPT.pt and, for SAC/TD3, its replay/ folder) in its runs/ folder: a rerun skips finished runs, resumes an
interrupted one exactly from its last checkpoint (`--resume`) and starts the others afresh. Runs go through submitit:
on this machine with its local executor, `--workers` at a time, each with cores / workers torch threads; on a Slurm
cluster with `--slurm-partition` (and `--slurm-time`, `--gpus-per-run`), where Slurm queues them all, and where a run
that is preempted or reaches --slurm-time is requeued by submitit (its Checkpointable interface) and resumes from its
last checkpoint. The progress lines say which runs resumed, from which step.

Outputs in OUTPUT: `evaluations.csv` (one row per run and evaluation), `TASK.md` (a table per task: final
evaluation return over seeds, mean +- std, interquartile mean with a 95% percentile-bootstrap interval, normalized
score, and the published numbers of `benchmarks/published.csv` for that task with their protocol and step count) and
`TASK.png` and `TASK.svg` (mean over seeds per script against environment steps, with a 95% bootstrap band, published
numbers up to 1.2x the runs' steps as marked points). `--aggregate-only` rebuilds these from the runs already there.
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import submitit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(ROOT, "benchmarks", "published.csv")
OFFLINE = {"decision_transformer.py", "decision_diffuser.py"}  # trained on --dataset, for --total-steps steps
CONFIDENCE = 0.95


@dataclass
class Run:
    script: str  # e.g. sac_continuous.py
    task: str  # an env id, or a dataset path or Minari id for the offline scripts
    seed: int
    folder: str
    command: list

    @property
    def name(self) -> str:
        return f"{self.script} {self.task} seed {self.seed}"


def task_slug(task: str) -> str:
    """A folder and file name for a task: Hopper-v5 stays, data/hopper_replay.npz becomes hopper_replay."""
    base = os.path.splitext(os.path.basename(task))[0] if task.endswith((".npz", ".hdf5")) else task
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base)


def plan_runs(args, extra: list) -> list:
    """Every (script, task, seed), ordered task by task, then seed by seed, then script: an interrupted check leaves
    whole seeds of every script on the first tasks."""
    for script in args.scripts:
        if not (args.datasets if script in OFFLINE else args.env_ids):
            sys.exit(f"reproduce.py: error: {script} needs {'--datasets' if script in OFFLINE else '--env-ids'}")
    runs = []
    for task in [*args.env_ids, *args.datasets]:
        for seed in args.seeds:
            for script in args.scripts:
                offline = script in OFFLINE
                if task not in (args.datasets if offline else args.env_ids):
                    continue
                if offline and os.path.exists(task):
                    task_arg = os.path.abspath(task)  # the runs work in their own folders
                else:
                    task_arg = task
                folder = os.path.join(os.path.abspath(args.output_dir), "jobs", script.removesuffix(".py"),
                                      task_slug(task), f"seed{seed}")
                command = [sys.executable, os.path.join(ROOT, script), "--dataset" if offline else "--env-id",
                           task_arg, "--seed", str(seed), "--total-steps" if offline else "--total-timesteps",
                           str(args.total_timesteps), "--save-model", *extra]
                runs.append(Run(script, task, seed, folder, command))  # tables name the task as it was given
    return runs


def latest_checkpoint(run: Run) -> tuple[str, int] | None:
    """(path, step) of the checkpoint an interrupted run left in its folder, or None."""
    import torch

    paths = glob.glob(os.path.join(run.folder, "runs", "*", run.script.replace(".py", ".pt")))
    if not paths:
        return None
    try:
        return paths[0], int(torch.load(paths[0], map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # unreadable: the run starts afresh
        return None


class Execute(submitit.helpers.Checkpointable):
    """One run, in its own folder, through the script's command line (this is what submitit executes). A run that
    left a checkpoint resumes from it. On Slurm, a job preempted or at its time limit gets submitit's signal: it stops
    the script and `checkpoint` (Checkpointable's) requeues this same call, which then resumes."""

    def __call__(self, run: dict, threads: int | None) -> dict:
        os.makedirs(run["folder"], exist_ok=True)
        env = dict(os.environ)
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        start, found = time.time(), latest_checkpoint(Run(**run))
        command = run["command"] + (["--resume", found[0]] if found else [])
        with open(os.path.join(run["folder"], "log.txt"), "a" if found else "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(command, cwd=run["folder"], stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                code = process.wait()
            finally:  # submitit's requeue signal, or any error here: the script stops with this job
                if process.poll() is None:
                    process.kill()
                    process.wait()
        result = dict(run, returncode=code, seconds=round(time.time() - start, 1), resumed_from=found and found[1])
        if code == 0:
            write_csv(os.path.join(run["folder"], "evaluations.csv"), extract_evaluations(Run(**run)))
            temporary = os.path.join(run["folder"], "done.json.tmp")
            with open(temporary, "w") as file:
                json.dump(result, file, indent=1)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, os.path.join(run["folder"], "done.json"))
        return result


def last_line(folder: str) -> str:
    try:
        lines = [line.strip() for line in open(os.path.join(folder, "log.txt")) if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def run_all(runs: list, args) -> list:
    """Submit the unfinished runs through submitit, at most --workers at a time on this machine; report each end."""
    import shutil

    todo = [run for run in runs if not os.path.exists(os.path.join(run.folder, "done.json"))]
    print(f"{len(runs)} runs: {len(runs) - len(todo)} finished before, {len(todo)} to run", flush=True)
    resumable = {run.name: latest_checkpoint(run) for run in todo}
    for name, found in resumable.items():
        if found:
            print(f"resuming {name} from step {found[1]}", flush=True)
    slurm = args.slurm_partition is not None
    executor = submitit.AutoExecutor(folder=os.path.join(args.output_dir, "submitit"),
                                     cluster="slurm" if slurm else "local")
    if slurm:
        executor.update_parameters(slurm_partition=args.slurm_partition, timeout_min=args.slurm_time,
                                   gpus_per_node=args.gpus_per_run, cpus_per_task=args.cpus_per_run)
        threads, limit = args.cpus_per_run, len(todo)
    else:
        executor.update_parameters(timeout_min=args.slurm_time)
        threads, limit = max(1, (os.cpu_count() or 1) // args.workers), args.workers
    pending, running, failed, finished, start = list(todo), {}, [], 0, time.time()
    while pending or running:
        while pending and len(running) < limit:
            run = pending.pop(0)
            if not resumable[run.name]:
                shutil.rmtree(run.folder, ignore_errors=True)  # an earlier try without a checkpoint starts afresh
            running[executor.submit(Execute(), asdict(run), threads)] = run
        time.sleep(0.5)
        for job in [job for job in running if job.done()]:
            run = running.pop(job)
            try:
                result = job.result()
                code, resumed = result["returncode"], result["resumed_from"]
            except Exception as error:  # the job itself died (killed, timed out, node failure)
                code, resumed = f"{type(error).__name__}", None
            finished += 1
            if code != 0:
                failed.append(run)
                print(f"FAILED {run.name} (exit {code}): {last_line(run.folder)}", flush=True)
            elapsed = time.time() - start
            eta = elapsed / finished * (len(todo) - finished)
            print(f"runs done {finished}/{len(todo)} ({len(failed)} failed) | {run.name}"
                  f"{f' (resumed from step {resumed})' if resumed else ''} | elapsed "
                  f"{elapsed / 60:.1f} min | ETA {eta / 60:.1f} min", flush=True)
    return failed


# ----------------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------------
def interquartile_mean(values) -> float:
    """The mean of the middle 50%: sort, drop the lowest and the highest quarter (floor(n / 4) values each)."""
    values = np.sort(np.asarray(values, dtype=float))
    cut = len(values) // 4
    return float(values[cut:len(values) - cut].mean())


def bootstrap_interval(values, statistic=interquartile_mean, resamples: int = 10_000, seed: int = 0):
    """95% percentile-bootstrap interval of `statistic` over `values` (scipy.stats.bootstrap)."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):
        return float(values[0]), float(values[0])
    result = bootstrap((values,), statistic, n_resamples=resamples, confidence_level=CONFIDENCE,
                       method="percentile", vectorized=False, random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def extract_evaluations(run: Run) -> list:
    """One row per evaluation of a run, from its TensorBoard logs: the eval/ return tags (one per target for DT)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = []
    for events_folder in sorted(glob.glob(os.path.join(run.folder, "runs", "*"))):
        events = EventAccumulator(events_folder, size_guidance={"scalars": 0})
        events.Reload()
        tags = events.Tags()["scalars"]
        for tag in tags:
            match = re.fullmatch(r"eval/(episodic_return|return_target_(.+))", tag)
            if not match:
                continue
            label = run.script.removesuffix(".py") + (f" (target {match[2]})" if match[2] else "")
            score_tag = tag.replace("episodic_return", "normalized_score").replace("return_target_",
                                                                                    "normalized_score_target_")
            scores = {e.step: e.value for e in events.Scalars(score_tag)} if score_tag in tags else {}
            for event in events.Scalars(tag):
                rows.append(dict(script=run.script, label=label, task=run.task, seed=run.seed, step=event.step,
                                 episodic_return=event.value, normalized_score=scores.get(event.step, "")))
    return rows


def write_csv(path: str, rows: list):
    fields = ["script", "label", "task", "seed", "step", "episodic_return", "normalized_score"]
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_evaluations(runs: list) -> list:
    """The evaluations of every finished run, from the `evaluations.csv` each wrote when it finished, under the task
    as this invocation names it (a run made in another clone holds that clone's absolute dataset path)."""
    rows = []
    for run in runs:
        path = os.path.join(run.folder, "evaluations.csv")
        if not os.path.exists(os.path.join(run.folder, "done.json")) or not os.path.exists(path):
            continue
        with open(path) as file:
            for row in csv.DictReader(file):
                rows.append(dict(row, task=run.task, seed=int(row["seed"]), step=int(row["step"]),
                                 episodic_return=float(row["episodic_return"]),
                                 normalized_score=float(row["normalized_score"]) if row["normalized_score"] else ""))
    return rows


def published_for(task: str, max_steps: float = math.inf) -> list:
    """Published rows for a task ("Hopper-v5" matches task Hopper of any version) up to max_steps, fewest steps
    first."""
    name = task.split("-v")[0].lower()
    with open(PUBLISHED) as file:
        rows = [row for row in csv.DictReader(file) if row["task"].lower() == name and int(row["steps"]) <= max_steps]
    return sorted(rows, key=lambda row: int(row["steps"]))


def final_results(rows: list) -> dict:
    """label -> (final step, {seed: return}, {seed: score}) at the last step every seed reached."""
    results = {}
    for label in sorted({row["label"] for row in rows}):
        mine = [row for row in rows if row["label"] == label]
        seeds = sorted({row["seed"] for row in mine})
        step = min(max(row["step"] for row in mine if row["seed"] == seed) for seed in seeds)
        final = [row for row in mine if row["step"] == step]
        results[label] = (step, {row["seed"]: row["episodic_return"] for row in final},
                          {row["seed"]: row["normalized_score"] for row in final if row["normalized_score"] != ""})
    return results


def markdown_table(task: str, rows: list) -> str:
    lines = [f"## {task}", "", "| script | step | seeds | return, mean +- std | IQM [95% CI] | normalized score |",
             "|---|---|---|---|---|---|"]
    for label, (step, returns, scores) in final_results(rows).items():
        values = np.array(list(returns.values()))
        low, high = bootstrap_interval(values)
        score = f"{np.mean(list(scores.values())):.1f}" if scores else "-"
        lines.append(f"| {label} | {step} | {len(values)} | {values.mean():.1f} +- {values.std():.1f} | "
                     f"{interquartile_mean(values):.1f} [{low:.1f}, {high:.1f}] | {score} |")
    published = published_for(task)
    if published:
        lines += ["", "Published (other environment versions and protocols; compare with care):", "",
                  "| source | algorithm | env | steps | seeds | return | protocol |", "|---|---|---|---|---|---|---|"]
        for row in published:
            spread = f" +- {row['spread']}" if row["spread"] else ""
            lines.append(f"| {row['source']} | {row['algorithm'].upper()} | {row['task']}-{row['env_version']} | "
                         f"{int(row['steps']):,} | {row['seeds'] or '-'} | {row['return']}{spread} | "
                         f"{row['protocol']} |")
    return "\n".join(lines) + "\n"


def plot(task: str, rows: list, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label in sorted({row["label"] for row in rows}):
        mine = [row for row in rows if row["label"] == label]
        steps = sorted({row["step"] for row in mine})
        means, lows, highs, kept = [], [], [], []
        for step in steps:
            values = [row["episodic_return"] for row in mine if row["step"] == step]
            low, high = bootstrap_interval(values, statistic=np.mean, resamples=2000)
            kept.append(step), means.append(np.mean(values)), lows.append(low), highs.append(high)
        line, = axes.plot(kept, means, marker=".", label=f"{label} ({len({row['seed'] for row in mine})} seeds)")
        axes.fill_between(kept, lows, highs, color=line.get_color(), alpha=0.2)
    # Published points within the runs' range only (the table lists them all): a 1M-step point would squash a
    # 100k-step curve into the left tenth of the picture.
    for marker, row in zip("ovs^D<>pP*", published_for(task, max_steps=1.2 * max(row["step"] for row in rows))):
        axes.plot(int(row["steps"]), float(row["return"]), marker, color="black", fillstyle="none",
                  label=f"{row['source']} ({row['algorithm'].upper()}, {row['task']}-{row['env_version']})")
    axes.set_xlabel("environment steps" if not any(row["script"] in OFFLINE for row in rows) else "training steps")
    axes.set_ylabel("evaluation return")
    axes.set_title(f"{task_slug(task)}: mean over seeds, 95% bootstrap band")  # a dataset by its file name
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path + ".png", dpi=110)
    figure.savefig(path + ".svg")
    plt.close(figure)


def aggregate(runs: list, output_dir: str):
    rows = read_evaluations(runs)
    if not rows:
        print("no finished run with evaluations to aggregate")
        return
    write_csv(os.path.join(output_dir, "evaluations.csv"), rows)
    for task in sorted({row["task"] for row in rows}):
        mine = [row for row in rows if row["task"] == task]
        name = task_slug(task)
        with open(os.path.join(output_dir, f"{name}.md"), "w") as file:
            file.write(markdown_table(task, mine))
        plot(task, mine, os.path.join(output_dir, name))
        print(markdown_table(task, mine))
    print(f"wrote {output_dir}/evaluations.csv and a table (.md) and a picture (.png, .svg) per task")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", required=True, help="scripts at the repository's top level")
    parser.add_argument("--env-ids", nargs="*", default=[], help="Gymnasium ids for sac/td3_continuous.py")
    parser.add_argument("--datasets", nargs="*", default=[], help="datasets for the offline scripts")
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--total-timesteps", type=int, required=True,
                        help="--total-timesteps of the online scripts, --total-steps of the offline ones")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time on this machine")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables and pictures")
    parser.add_argument("--slurm-partition", help="run on Slurm, in this partition (through submitit)")
    parser.add_argument("--slurm-time", type=int, default=24 * 60, help="time limit of one run, minutes")
    parser.add_argument("--gpus-per-run", type=int, default=0)
    parser.add_argument("--cpus-per-run", type=int, default=2)
    args = parser.parse_args(argv)
    for script in args.scripts:
        if not os.path.isfile(os.path.join(ROOT, script)):
            parser.error(f"--scripts: no {script} at the repository's top level")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    os.makedirs(args.output_dir, exist_ok=True)
    runs = plan_runs(args, extra)
    failed = [] if args.aggregate_only else run_all(runs, args)
    aggregate(runs, args.output_dir)
    if failed:
        print(f"{len(failed)} run(s) failed: " + "; ".join(f"{run.name}: {last_line(run.folder)}" for run in failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
