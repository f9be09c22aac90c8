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

Peers: `--scripts` also takes `sb3_sac` and `sb3_td3`, Stable-Baselines3's SAC and TD3 run by
`benchmarks/sb3_peer.py --algo sac|td3` with our scripts' default hyperparameters and our evaluation protocol (see
that file). They run, are tabled and drawn like our scripts, under their own names (OUTPUT/jobs/sb3_sac/..., label
`sb3_sac`); they write no checkpoint the harness resumes from, so an interrupted peer run starts afresh. The tables
and pictures of an invocation hold the runs it names (finished ones included), so name ours beside the peers:

    python benchmarks/reproduce.py --scripts sac_continuous.py td3_continuous.py sb3_sac sb3_td3 \
        --env-ids HalfCheetah-v5 --seeds 1 2 3 --total-timesteps 100000 --workers 2 --output-dir OUT

The Decision Transformer's peer is d3rlpy's (`d3rlpy_dt`, run by `benchmarks/d3rlpy_peer.py` with our script's
settings and evaluation protocol; it checkpoints at its evaluations, so an interrupted run resumes like ours).
d3rlpy pins its own Gymnasium, so it runs in an environment of its own
(benchmarks/requirements-d3rlpy.txt) whose Python D3RLPY_PYTHON names:

    D3RLPY_PYTHON=~/venvs/d3rlpy/bin/python python benchmarks/reproduce.py --scripts decision_transformer.py \
        d3rlpy_dt --datasets hopper-medium-v0.npz --seeds 1 --total-timesteps 100000 --final-eval-episodes 100 \
        --workers 2 --output-dir OUT -- --eval-episodes 10

`--final-eval-episodes N`: each offline run that finishes is then evaluated once more, its last model over N
episodes per target, through the program's evaluation-only mode (`--eval-checkpoint`), with the run's own seeds (its
first episodes are those of the run's evaluations) and evaluation flags (EVALUATION_FLAGS: the Decision Diffuser's
sampler, for one); the result goes to the run's `final_evaluation.csv` and to the
tables. A run counts as finished (done.json) only once that evaluation is written.

Outputs in OUTPUT: `evaluations.csv` (one row per run and evaluation), `TASK.md` (a table per task: final
evaluation return over seeds, mean +- std, interquartile mean with a 95% percentile-bootstrap interval, normalized
score; where a peer and our script of the same algorithm both ran, the difference of their means with a 95%
bootstrap interval; the published curves of `benchmarks/published/` at matched environment steps; and the published
points of `benchmarks/published.csv` for that task with their protocol and step count) and `TASK.png` and
`TASK.svg` (mean over seeds per script against environment steps, with a 95% bootstrap band; behind them the
published curves of the same algorithms as bands, mean +- std over their seeds, up to the runs' last step; published
points up to 1.2x the runs' steps as marked points; for a dataset file, the data's mean episode return as a dashed
line, also given under the table). `--aggregate-only` rebuilds these from the runs already there.

Published curves (`benchmarks/published/*.csv`, described in its README.md) hold each source's per-seed evaluations
with its x-axis converted to environment steps. "Matched environment steps": a script's final step S is compared
with the source's evaluation at the largest environment step <= S (the nearest evaluation not after S; no
interpolation), mean +- std (population) over the source's seeds. Rows of published.csv that were read off one of
these curves name it in their `curve` column and are shown through the curve, not again as points.
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
PUBLISHED_CURVES = os.path.join(ROOT, "benchmarks", "published")  # per-seed curves in environment steps (README.md)
OFFLINE = {"decision_transformer.py", "decision_diffuser.py", "d3rlpy_dt"}  # trained on --dataset, for --total-steps
PEERS = {"sb3_sac": "sac", "sb3_td3": "td3", "d3rlpy_dt": "dt"}  # --scripts name -> the algorithm it implements
# A peer's program: benchmarks/FILE with these flags, run by the Python named by the environment variable (a peer
# that pins its own versions lives in its own environment), else by this one.
PEER_PROGRAMS = {"sb3_sac": ("sb3_peer.py", ["--algo", "sac"], None),
                 "sb3_td3": ("sb3_peer.py", ["--algo", "td3"], None),
                 "d3rlpy_dt": ("d3rlpy_peer.py", [], "D3RLPY_PYTHON")}
ALGORITHMS = {"sac_continuous": "sac", "td3_continuous": "td3", "decision_transformer": "dt", **PEERS}  # label -> algo
CONFIDENCE = 0.95
FINAL_FIELDS = ["script", "label", "task", "seed", "step", "episodes", "episodic_return", "std", "normalized_score"]


@dataclass
class Run:
    script: str  # e.g. sac_continuous.py
    task: str  # an env id, or a dataset path or Minari id for the offline scripts
    seed: int
    folder: str
    command: list
    final_episodes: int = 0  # offline runs: evaluate the final model over this many episodes per target at the end

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
                command = [*script_command(script), "--dataset" if offline else "--env-id",
                           task_arg, "--seed", str(seed), "--total-steps" if offline else "--total-timesteps",
                           str(args.total_timesteps), "--save-model", *extra]
                runs.append(Run(script, task, seed, folder, command,  # tables name the task as it was given
                                args.final_eval_episodes if offline else 0))
    return runs


def script_command(script: str) -> list:
    """The program of a --scripts name, with its Python: one of our scripts at the top level, or a peer's file."""
    if script not in PEERS:
        return [sys.executable, os.path.join(ROOT, script)]
    file, flags, python_variable = PEER_PROGRAMS[script]
    python = os.environ.get(python_variable, "") if python_variable else sys.executable
    if not python or not os.path.isfile(python):
        sys.exit(f"reproduce.py: error: {script} runs in its own environment: set {python_variable} to its Python "
                 f"(see benchmarks/{file})")
    return [python, os.path.join(ROOT, "benchmarks", file), *flags]


# Flags that an offline program's evaluation-only mode reads from its command line, not from the checkpoint (the
# Decision Diffuser's sampler, guidance and return condition; the evaluation env and device): the final evaluation
# repeats those the run was given, so that it evaluates as the run's own evaluations did.
EVALUATION_FLAGS = {"--sampler", "--sampling-steps", "--ddim-eta", "--guidance-weight", "--temperature",
                    "--test-return", "--target-returns", "--env-id", "--no-cuda"}


def evaluation_flags(command: list) -> list:
    """The EVALUATION_FLAGS of a run's command, each with its values."""
    flags, keep = [], False
    for token in command:
        if token.startswith("--"):
            keep = token.split("=")[0] in EVALUATION_FLAGS
        if keep:
            flags.append(token)
    return flags


def final_evaluation(run: "Run", log, env: dict) -> int:
    """Evaluate a finished offline run's model over run.final_episodes episodes per target, through the program's
    evaluation-only mode (--eval-checkpoint), into final_evaluation.csv. Returns the exit code."""
    model = (latest_checkpoint(run) or [None])[0]
    if model is None:
        log.write(f"no saved model in {run.folder}/runs for the final evaluation\n")
        return 1
    command = [*script_command(run.script), "--eval-checkpoint", model, "--eval-episodes", str(run.final_episodes),
               *evaluation_flags(run.command)]
    log.write(" ".join(command) + "\n")
    log.flush()
    result = subprocess.run(command, cwd=run.folder, capture_output=True, text=True, env=env)
    log.write(result.stdout + result.stderr)
    # One line per target (DT and its peer: "... (step N) on ENV, target T: MEAN +- STD over E episodes (normalized
    # score X, ..."), or the Decision Diffuser's "... (step N) on ..." and then "final evaluation: MEAN +- STD ...".
    returns = r"(\S+) \+- (\S+) over (\d+) episodes(?: \(normalized score ([^,)]+))?"
    step = re.search(r"evaluation of .* \(step (\d+)\) on ", result.stdout)
    found = [(f" (target {match[1]})", match.groups()[1:]) for match in
             re.finditer(r"evaluation of .* \(step \d+\) on .*, target (\S+): " + returns, result.stdout)] or \
            [("", match.groups()) for match in re.finditer(r"final evaluation: " + returns, result.stdout)]
    rows = [dict(script=run.script, label=run.script.removesuffix(".py") + target, task=run.task, seed=run.seed,
                 step=int(step[1]), episodes=int(episodes), episodic_return=float(mean), std=float(std),
                 normalized_score=score or "") for target, (mean, std, episodes, score) in found] if step else []
    if result.returncode != 0 or not rows:
        return result.returncode or 1
    with open(os.path.join(run.folder, "final_evaluation.csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FINAL_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return 0


def latest_checkpoint(run: Run) -> tuple[str, int] | None:
    """(path, step) of the checkpoint an interrupted run left in its folder, or None."""
    import torch

    paths = glob.glob(os.path.join(run.folder, "runs", "*", run.script.removesuffix(".py") + ".pt"))
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
        total = int(next(value for flag, value in zip(command, command[1:]) if flag.startswith("--total-")))
        with open(os.path.join(run["folder"], "log.txt"), "a" if found else "w") as log:
            if found and found[1] >= total:  # stopped after its final checkpoint, before done.json: training is over
                log.write(f"the run's final checkpoint (step {found[1]}) is there: nothing left to train\n")
                code = 0
            else:
                log.write(" ".join(command) + "\n")
                log.flush()
                process = subprocess.Popen(command, cwd=run["folder"], stdout=log, stderr=subprocess.STDOUT,
                                           env=env)
                try:
                    code = process.wait()
                finally:  # submitit's requeue signal, or any error here: the script stops with this job
                    if process.poll() is None:
                        process.kill()
                        process.wait()
            if code == 0 and run["final_episodes"] and not os.path.exists(
                    os.path.join(run["folder"], "final_evaluation.csv")):
                code = final_evaluation(Run(**run), log, env)
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


def read_final_evaluations(runs: list) -> list:
    """The final evaluations (--final-eval-episodes) of every finished offline run that has one."""
    rows = []
    for run in runs:
        path = os.path.join(run.folder, "final_evaluation.csv")
        if os.path.exists(os.path.join(run.folder, "done.json")) and os.path.exists(path):
            with open(path) as file:
                rows += [dict(row, task=run.task, seed=int(row["seed"])) for row in csv.DictReader(file)]
    return rows


def data_returns(task: str) -> tuple | None:
    """(mean episode return, its normalized score or None) of an offline task's .npz file, else None: the data's
    level, drawn and tabled beside the runs. Normalized with the file's own references (docs/datasets.md)."""
    if not (task.endswith(".npz") and os.path.exists(task)):
        return None
    with np.load(task) as data:
        ends = np.flatnonzero(data["terminals"] | data["timeouts"])
        returns = np.diff(np.concatenate([[0.0], np.cumsum(data["rewards"], dtype=np.float64)[ends]]))
        refs = data["ref_scores"][:2].astype(float) if "ref_scores" in data else None
    mean = float(returns.mean())
    return mean, (100.0 * (mean - refs[0]) / (refs[1] - refs[0]) if refs is not None else None)


def difference_interval(ours, theirs, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(ours) - mean(theirs): each group resampled with replacement on its
    own (independent runs, not pairs), the difference of the resampled means taken `resamples` times."""
    ours, theirs = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    rng = np.random.default_rng(seed)
    differences = (ours[rng.integers(0, len(ours), (resamples, len(ours)))].mean(axis=1)
                   - theirs[rng.integers(0, len(theirs), (resamples, len(theirs)))].mean(axis=1))
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(differences, [tail, 100 - tail])
    return float(low), float(high)


def published_for(task: str, max_steps: float = math.inf) -> list:
    """Published rows for a task ("Hopper-v5" matches task Hopper of any version) up to max_steps, fewest steps
    first."""
    name = task.split("-v")[0].lower()
    with open(PUBLISHED) as file:
        rows = [row for row in csv.DictReader(file) if row["task"].lower() == name and int(row["steps"]) <= max_steps]
    return sorted(rows, key=lambda row: int(row["steps"]))


def published_points(task: str, max_steps: float = math.inf) -> list:
    """The rows of published_for that are points of their own, not read off a curve of benchmarks/published/."""
    return [row for row in published_for(task, max_steps) if not row.get("curve")]


@dataclass
class Curve:
    """A published learning curve: `values[i, j]` is seed j's evaluation at `env_steps[i]` environment steps, which
    the source's own x-axis calls `source_x[i]`. `meta` holds the file's `# key: value` lines (source, algorithm,
    task, env_version, commit, file, x_axis, protocol, settings)."""
    name: str
    meta: dict
    env_steps: np.ndarray
    source_x: np.ndarray
    values: np.ndarray

    @property
    def label(self) -> str:
        return (f"{self.meta['source']} {self.meta['algorithm'].upper()} ({self.meta['task']}-"
                f"{self.meta['env_version']}, {self.values.shape[1]} seeds)")


def read_curve(path: str) -> Curve:
    meta, lines = {}, []
    with open(path) as file:
        for line in file:
            if line.startswith("#"):
                key, _, value = line[1:].partition(":")
                meta[key.strip()] = value.strip()
            else:
                lines.append(line)
    table = list(csv.DictReader(lines))
    seeds = sorted((column for column in table[0] if re.fullmatch(r"seed_\d+", column)), key=lambda c: int(c[5:]))
    return Curve(os.path.basename(path), meta, np.array([int(row["env_steps"]) for row in table]),
                 np.array([int(row["source_x"]) for row in table]),
                 np.array([[float(row[seed]) for seed in seeds] for row in table]))


def published_curves(task: str, algorithms=None) -> list:
    """The curves of benchmarks/published/ for a task ("Hopper-v5" matches task Hopper of any version), of the given
    algorithms (all if None), in file-name order."""
    name = task.split("-v")[0].lower()
    curves = [read_curve(path) for path in sorted(glob.glob(os.path.join(PUBLISHED_CURVES, "*.csv")))]
    return [curve for curve in curves if curve.meta["task"].lower() == name
            and (algorithms is None or curve.meta["algorithm"] in algorithms)]


def value_at(curve: Curve, step: int):
    """The curve's evaluation matched with our step: the one at the largest environment step <= `step` (the nearest
    not after it, no interpolation), as (env_steps, source_x, per-seed values); None before its first evaluation."""
    before = np.flatnonzero(curve.env_steps <= step)
    if len(before) == 0:
        return None
    index = before[np.argmax(curve.env_steps[before])]
    return int(curve.env_steps[index]), int(curve.source_x[index]), curve.values[index]


def curve_band(curve: Curve, last: float = math.inf) -> tuple:
    """(environment steps, mean, std) of a published curve up to `last` environment steps: the mean and the
    population std over its seeds at each evaluation (as Tianshou's shaded band and the TD3 paper's +- std)."""
    shown = curve.env_steps <= last
    return curve.env_steps[shown], curve.values[shown].mean(axis=1), curve.values[shown].std(axis=1)


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


def best_of_mean_curve(rows: list) -> tuple:
    """(step, mean, std) at the evaluation where the mean over seeds is highest, among the steps every seed reached:
    the TD3 paper's "max average return" (its Table 1 equals this statistic of the authors' 10 per-seed curves in
    benchmarks/published/, with the population std over seeds at that evaluation)."""
    seeds = {row["seed"] for row in rows}
    by_step = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row["episodic_return"])
    step = max((step for step, values in by_step.items() if len(values) == len(seeds)),
               key=lambda step: np.mean(by_step[step]))
    return step, float(np.mean(by_step[step])), float(np.std(by_step[step]))


def peer_lines(results: dict) -> list:
    """Our script against a peer of the same algorithm at the same final step: the difference of the means."""
    lines = []
    for ours, (step, returns, _) in results.items():
        for peer, (peer_step, peer_returns, _) in results.items():
            (name, _, target), (peer_name, _, peer_target) = ours.partition(" (target "), peer.partition(" (target ")
            if name in PEERS or peer_name not in PEERS or ALGORITHMS.get(name) != PEERS[peer_name] or \
                    step != peer_step or target != peer_target:
                continue
            a, b = np.array(list(returns.values())), np.array(list(peer_returns.values()))
            low, high = difference_interval(a, b)
            lines.append(f"| {ours} | {peer} | {step} | {len(a)} vs {len(b)} | {a.mean():.1f} +- {a.std():.1f} | "
                         f"{b.mean():.1f} +- {b.std():.1f} | {a.mean() - b.mean():+.1f} [{low:+.1f}, {high:+.1f}] |")
    if not lines:
        return []
    return ["", "Against a peer (the same algorithm and settings in another library, our evaluation protocol): "
            "difference of the means over seeds, ours minus the peer's, with a 95% percentile-bootstrap interval "
            "(each group resampled on its own):", "",
            "| ours | peer | step | seeds | ours, mean +- std | peer, mean +- std | difference [95% CI] |",
            "|---|---|---|---|---|---|---|", *lines]


def curve_lines(task: str, results: dict) -> list:
    """Each of our labels against the published curves of its algorithm, at matched environment steps."""
    lines = []
    for label, (step, returns, _) in results.items():
        if label not in ALGORITHMS:
            continue
        ours = np.array(list(returns.values()))
        for curve in published_curves(task, [ALGORITHMS[label]]):
            matched = value_at(curve, step)
            if matched is None:
                continue
            at, source_x, theirs = matched
            low, high = difference_interval(ours, theirs)
            spread = theirs.std()
            lines.append(f"| {label} | {step} | {ours.mean():.1f} +- {ours.std():.1f} | {curve.meta['source']} "
                         f"({curve.meta['task']}-{curve.meta['env_version']}) | "
                         f"{at} ({curve.meta.get('x_name', 'x =')} "
                         f"{source_x}) | {len(theirs)} | "
                         f"{theirs.mean():.1f} +- {spread:.1f} | {ours.mean() - theirs.mean():+.1f} "
                         f"[{low:+.1f}, {high:+.1f}] | "
                         f"{(ours.mean() - theirs.mean()) / spread if spread else math.nan:+.2f} |")
    if not lines:
        return []
    return ["", "Published curves at matched environment steps (`benchmarks/published/`; other environment versions "
            "and protocols, compare with care): the source's evaluation at the largest environment step not after "
            "ours (its own x-axis value in brackets), mean +- std over its seeds; the difference of the means, ours "
            "minus theirs, with a 95% percentile-bootstrap interval (each group resampled on its own), and in units "
            "of the published std:", "",
            "| ours | step | ours, mean +- std | published curve | its env step (its x) | seeds | published, "
            "mean +- std | difference [95% CI] | in published std |", "|---|---|---|---|---|---|---|---|---|", *lines]


def final_lines(final: list) -> list:
    """The final evaluations over many episodes (--final-eval-episodes), a row per label: mean +- std over seeds of
    each seed's mean, and the normalized score."""
    lines = []
    for label in sorted({row["label"] for row in final}):
        mine = [row for row in final if row["label"] == label]
        values = np.array([float(row["episodic_return"]) for row in mine])
        scores = [float(row["normalized_score"]) for row in mine if row["normalized_score"] != ""]
        score = f"{np.mean(scores):.1f}" if scores else "-"
        lines.append(f"| {label} | {mine[0]['step']} | {len(mine)} | {mine[0]['episodes']} | "
                     f"{values.mean():.1f} +- {values.std():.1f} | {score} |")
    return ["", "Final evaluation of the last model over more episodes (`--final-eval-episodes`), with the run's own "
            "evaluation protocol and seeds (its first episodes are those of the run's last evaluation):", "",
            "| script | step | seeds | episodes per target | return, mean +- std over seeds | normalized score |",
            "|---|---|---|---|---|---|", *lines] if lines else []


def markdown_table(task: str, rows: list, final: list = ()) -> str:
    lines = [f"## {task}", "", "| script | step | seeds | return, mean +- std | IQM [95% CI] | normalized score | "
             "best of the mean curve (its step) |", "|---|---|---|---|---|---|---|"]
    results = final_results(rows)
    for label, (step, returns, scores) in results.items():
        values = np.array(list(returns.values()))
        low, high = bootstrap_interval(values)
        score = f"{np.mean(list(scores.values())):.1f}" if scores else "-"
        best_step, best, spread = best_of_mean_curve([row for row in rows if row["label"] == label])
        lines.append(f"| {label} | {step} | {len(values)} | {values.mean():.1f} +- {values.std():.1f} | "
                     f"{interquartile_mean(values):.1f} [{low:.1f}, {high:.1f}] | {score} | "
                     f"{best:.1f} +- {spread:.1f} ({best_step}) |")
    lines += ["", "Return: the final evaluation of each seed (mean of its episodes), mean +- std over seeds. Best of "
              "the mean curve: the highest evaluation of the mean over seeds, +- the std over seeds there, the "
              "statistic of the TD3 paper's Table 1 (\"max average return\")."]
    lines += final_lines(list(final))
    data = data_returns(task)
    if data is not None:
        lines += ["", f"The data: mean episode return {data[0]:.1f}" +
                  (f" (normalized score {data[1]:.1f})." if data[1] is not None else ".")]
    lines += peer_lines(results)
    lines += curve_lines(task, results)
    published = published_points(task)
    if published:
        lines += ["", "Published points (other environment versions and protocols; compare with care):", "",
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
    last = max(row["step"] for row in rows)
    # Behind ours: the published curves of the algorithms drawn here, mean +- std over their seeds, up to our last
    # step (dashed: SAC, dotted: TD3).
    algorithms = {ALGORITHMS[row["label"]] for row in rows if row["label"] in ALGORITHMS}
    data = data_returns(task)
    if data is not None:  # an offline run's data: its mean episode return
        axes.axhline(data[0], color="0.3", linestyle="--", linewidth=1, zorder=1, label="the data's mean return")
    colours = ["0.45", "tab:olive", "tab:brown", "tab:pink", "tab:cyan", "tab:purple"]
    for colour, curve in zip(colours, published_curves(task, algorithms) if algorithms else []):
        steps, mean, spread = curve_band(curve, last)
        if not len(steps):
            continue
        axes.fill_between(steps, mean - spread, mean + spread, color=colour, alpha=0.15, linewidth=0, zorder=1)
        axes.plot(steps, mean, color=colour, linestyle="--" if curve.meta["algorithm"] == "sac" else ":",
                  linewidth=1.2, zorder=1.5, label=f"{curve.label}, mean +- std")
    for label in sorted({row["label"] for row in rows}):
        mine = [row for row in rows if row["label"] == label]
        steps = sorted({row["step"] for row in mine})
        means, lows, highs, kept = [], [], [], []
        for step in steps:
            values = [row["episodic_return"] for row in mine if row["step"] == step]
            low, high = bootstrap_interval(values, statistic=np.mean, resamples=2000)
            kept.append(step), means.append(np.mean(values)), lows.append(low), highs.append(high)
        line, = axes.plot(kept, means, marker=".", zorder=3,
                          label=f"{label} ({len({row['seed'] for row in mine})} seeds)")
        axes.fill_between(kept, lows, highs, color=line.get_color(), alpha=0.2, zorder=2)
    # Published points within the runs' range only (the table lists them all): a 1M-step point would squash a
    # 100k-step curve into the left tenth of the picture.
    for marker, row in zip("ovs^D<>pP*", published_points(task, max_steps=1.2 * last)):
        axes.plot(int(row["steps"]), float(row["return"]), marker, color="black", fillstyle="none", zorder=4,
                  label=f"{row['source']} ({row['algorithm'].upper()}, {row['task']}-{row['env_version']})")
    axes.set_xlabel("environment steps" if not any(row["script"] in OFFLINE for row in rows) else "training steps")
    axes.set_ylabel("evaluation return")
    # a dataset by its file name
    axes.set_title(f"{task_slug(task)}: mean over seeds, 95% bootstrap band" if not algorithms else
                   f"{task_slug(task)}: ours, mean over seeds, 95% bootstrap band; published, mean +- std", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6.5, loc="best")
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
    final = read_final_evaluations(runs)
    for task in sorted({row["task"] for row in rows}):
        mine = [row for row in rows if row["task"] == task]
        name = task_slug(task)
        table = markdown_table(task, mine, [row for row in final if row["task"] == task])
        with open(os.path.join(output_dir, f"{name}.md"), "w") as file:
            file.write(table)
        plot(task, mine, os.path.join(output_dir, name))
        print(table)
    print(f"wrote {output_dir}/evaluations.csv and a table (.md) and a picture (.png, .svg) per task")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", required=True,
                        help=f"scripts at the repository's top level, or the peers {', '.join(PEERS)}")
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
    parser.add_argument("--final-eval-episodes", type=int, default=0,
                        help="offline runs: at the end, evaluate the final model over this many episodes per target "
                             "(its evaluation-only mode) into final_evaluation.csv and the tables; 0: do not")
    args = parser.parse_args(argv)
    for script in args.scripts:
        if script not in PEERS and not os.path.isfile(os.path.join(ROOT, script)):
            parser.error(f"--scripts: no {script} at the repository's top level (peers: {', '.join(PEERS)})")
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
