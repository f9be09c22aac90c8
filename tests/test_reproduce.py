"""Tests of benchmarks/reproduce.py: the harness end to end through its command line (submitit's local executor, the
same code path as Slurm), reruns, failures, and the statistics against hand computations."""

import csv
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import reproduce  # noqa: E402

# Flags that both sac_continuous.py and td3_continuous.py take: a few hundred updates on Pendulum-v1.
SHORT = ["--learning-starts", "500", "--eval-every", "500", "--eval-episodes", "2", "--log-every", "500",
         "--batch-size", "32"]


def harness(*arguments: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "reproduce.py"), *arguments], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


def test_two_scripts_two_seeds_end_to_end_then_a_rerun_skips_them(tmp_path):
    output = tmp_path / "results"
    command = ["--scripts", "sac_continuous.py", "td3_continuous.py", "--env-ids", "Pendulum-v1", "--seeds", "1", "2",
               "--total-timesteps", "1000", "--workers", "2", "--output-dir", str(output), "--", *SHORT]
    first = harness(*command, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "runs done 4/4 (0 failed)" in first.stdout
    for script in ("sac_continuous", "td3_continuous"):
        for seed in (1, 2):
            folder = output / "jobs" / script / "Pendulum-v1" / f"seed{seed}"
            assert (folder / "done.json").exists() and (folder / "evaluations.csv").exists()
            assert f"--seed {seed}" in (folder / "log.txt").read_text().splitlines()[0]  # its own command line

    rows = list(csv.DictReader(open(output / "evaluations.csv")))
    assert len(rows) == 2 * 2 * 2  # scripts x seeds x evaluations (steps 500 and 1000)
    assert {(row["script"], row["seed"], row["step"]) for row in rows} == {
        (script, seed, step) for script in ("sac_continuous.py", "td3_continuous.py") for seed in ("1", "2")
        for step in ("500", "1000")}
    table = (output / "Pendulum-v1.md").read_text()
    final = {row["seed"]: float(row["episodic_return"]) for row in rows
             if row["script"] == "sac_continuous.py" and row["step"] == "1000"}
    mean, std = np.mean(list(final.values())), np.std(list(final.values()))
    assert f"| sac_continuous | 1000 | 2 | {mean:.1f} +- {std:.1f} |" in table  # the table holds the final returns
    assert "| td3_continuous | 1000 | 2 |" in table
    png = (output / "Pendulum-v1.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (output / "Pendulum-v1.svg").read_text().lstrip().startswith("<?xml")

    log = output / "jobs" / "sac_continuous" / "Pendulum-v1" / "seed1" / "log.txt"
    before = log.stat().st_mtime_ns
    second = harness(*command, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "4 runs: 4 finished before, 0 to run" in second.stdout
    assert log.stat().st_mtime_ns == before  # not run again


def test_a_failed_run_is_reported_with_its_last_log_line_and_run_again_next_time(tmp_path):
    output = tmp_path / "results"
    command = ["--scripts", "sac_continuous.py", "--env-ids", "NoSuchEnv-v0", "--seeds", "1", "--total-timesteps",
               "1000", "--output-dir", str(output)]
    first = harness(*command, cwd=tmp_path)
    assert first.returncode == 1
    failure = [line for line in first.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failure) == 1 and "sac_continuous.py NoSuchEnv-v0 seed 1" in failure[0]
    assert "sac_continuous.py: error: cannot make environment 'NoSuchEnv-v0'" in failure[0]  # the script's own error
    assert "1 run(s) failed" in first.stdout
    second = harness(*command, cwd=tmp_path)
    assert "1 runs: 0 finished before, 1 to run" in second.stdout


def wait_for(path_pattern: str, process=None, timeout: float = 300.0) -> str:
    """The first file matching `path_pattern` once it exists (a run's checkpoint)."""
    import glob
    import time

    deadline = time.time() + timeout
    while not glob.glob(path_pattern):
        assert time.time() < deadline and (process is None or not process.poll()), f"no {path_pattern}"
        time.sleep(0.05)
    return glob.glob(path_pattern)[0]


def test_a_rerun_resumes_an_interrupted_run_from_its_checkpoint(tmp_path):
    """The harness killed (the whole process group, as a reboot would) after a run's first checkpoint: the rerun says
    which run resumed and from which step, and the run ends with each evaluation once, as if never interrupted."""
    import signal

    output = tmp_path / "results"
    command = ["--scripts", "sac_continuous.py", "--env-ids", "Pendulum-v1", "--seeds", "1", "--total-timesteps",
               "1400", "--output-dir", str(output), "--", *SHORT, "--checkpoint-every", "200"]
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", "reproduce.py"), *command],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    wait_for(str(output / "jobs" / "sac_continuous" / "Pendulum-v1" / "seed1" / "runs" / "*" / "*.pt"), process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    second = harness(*command, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    resumed = [line for line in second.stdout.splitlines() if line.startswith("resuming")]
    assert len(resumed) == 1 and resumed[0].startswith("resuming sac_continuous.py Pendulum-v1 seed 1 from step ")
    step = int(resumed[0].split()[-1])
    assert f"runs done 1/1 (0 failed) | sac_continuous.py Pendulum-v1 seed 1 (resumed from step {step})" in second.stdout
    rows = list(csv.DictReader(open(output / "evaluations.csv")))
    assert [row["step"] for row in rows] == ["500", "1000", "1400"]


def test_a_requeued_submitit_job_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """submitit's own requeue (its local executor, the code path of a Slurm preemption or time limit): the job gets
    the signal after the run's first checkpoint, Execute's checkpoint() requeues it, and the run resumes there."""
    import contextlib
    import signal

    import submitit

    monkeypatch.setenv("PYTHONPATH", os.path.join(ROOT, "benchmarks"))  # the job unpickles reproduce.Execute
    plan = SimpleNamespace(scripts=["td3_continuous.py"], datasets=[], env_ids=["Pendulum-v1"], seeds=[1],
                           total_timesteps=1400, output_dir=str(tmp_path / "out"))
    run = reproduce.plan_runs(plan, [*SHORT, "--checkpoint-every", "200"])[0]
    executor = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="local")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(reproduce.Execute(), reproduce.asdict(run), 1)
    wait_for(os.path.join(run.folder, "runs", "*", "td3_continuous.pt"), SimpleNamespace(poll=lambda: job.done()))
    # The signal Slurm sends before preempting or at the time limit (USR2), to the submitit task running Execute:
    # the parent of the script's process.
    def runs_the_script(pid: str) -> bool:  # a process of td3_continuous.py working in the run's folder
        with contextlib.suppress(OSError):
            return b"td3_continuous.py" in open(f"/proc/{pid}/cmdline", "rb").read() and os.readlink(
                f"/proc/{pid}/cwd") == run.folder
        return False

    script = [pid for pid in os.listdir("/proc") if pid.isdigit() and runs_the_script(pid)]
    assert len(script) == 1, script
    status = open(f"/proc/{script[0]}/status").read()
    os.kill(int(status.split("PPid:")[1].split()[0]), signal.SIGUSR2)
    result = job.result()
    assert result["returncode"] == 0 and result["resumed_from"] >= 200, result
    log = open(os.path.join(run.folder, "log.txt")).read()
    assert f"resumed at step {result['resumed_from']}" in log
    assert [line for line in log.splitlines() if line.startswith(sys.executable)][-1].endswith(
        f"--resume {reproduce.latest_checkpoint(run)[0]}")


def test_offline_scripts_get_their_dataset_and_step_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "replay.npz").write_bytes(b"")
    plan = SimpleNamespace(scripts=["decision_transformer.py"], datasets=["data/replay.npz", "mujoco/hopper/medium-v0"],
                           env_ids=[], seeds=[1, 2], total_timesteps=300, output_dir=str(tmp_path / "out"))
    runs = reproduce.plan_runs(plan, ["--batch-size", "8"])
    assert len(runs) == 4
    first = runs[0].command
    dataset = str(tmp_path / "data" / "replay.npz")  # absolute: each run works in its own folder
    assert first[1:] == [os.path.join(ROOT, "decision_transformer.py"), "--dataset", dataset, "--seed", "1",
                         "--total-steps", "300", "--save-model", "--batch-size", "8"]
    assert runs[0].task == "data/replay.npz"  # the tables name it as the user did, on any machine
    assert runs[0].folder.endswith(os.path.join("jobs", "decision_transformer", "replay", "seed1"))
    assert [run.seed for run in runs] == [1, 2, 1, 2]  # task by task, then seed by seed
    assert runs[2].command[3] == "mujoco/hopper/medium-v0"  # a Minari id is passed as it is
    assert runs[2].folder.endswith(os.path.join("decision_transformer", "mujoco_hopper_medium-v0", "seed1"))


def test_aggregation_names_each_task_as_this_invocation_does(tmp_path):
    """A run made in another clone wrote that clone's absolute dataset path into its evaluations.csv."""
    run = reproduce.Run("decision_transformer.py", "data/replay.npz", 1, str(tmp_path), [])
    reproduce.write_csv(str(tmp_path / "evaluations.csv"), [dict(
        script=run.script, label="decision_transformer (target 6000)", task="/elsewhere/data/replay.npz", seed=1,
        step=500, episodic_return=12.5, normalized_score=3.0)])
    assert reproduce.read_evaluations([run]) == []  # not finished: no done.json yet
    (tmp_path / "done.json").write_text("{}")
    rows = reproduce.read_evaluations([run])
    assert [(row["task"], row["step"], row["episodic_return"], row["normalized_score"]) for row in rows] == [
        ("data/replay.npz", 500, 12.5, 3.0)]


def test_the_picture_of_a_dataset_is_titled_by_its_file_name(tmp_path, monkeypatch):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # text stays text in the SVG
    rows = [dict(script="decision_diffuser.py", label="decision_diffuser", task="/some/where/data/replay.npz", seed=seed,
                 step=step, episodic_return=float(step + seed), normalized_score="")
            for seed in (1, 2) for step in (100, 200, 300)]
    reproduce.plot("/some/where/data/replay.npz", rows, str(tmp_path / "replay"))
    svg = (tmp_path / "replay.svg").read_text()
    assert "replay: mean over seeds" in svg and "/some/where" not in svg
    assert "training steps" in svg  # an offline script's x axis


def test_interquartile_mean_by_hand():
    assert reproduce.interquartile_mean([8, 1, 7, 2, 6, 3, 5, 4]) == pytest.approx(4.5)  # mean of 3, 4, 5, 6
    assert reproduce.interquartile_mean([1, 2, 3, 100]) == pytest.approx(2.5)  # mean of 2, 3
    assert reproduce.interquartile_mean([1, 2, 30]) == pytest.approx(11.0)  # fewer than 4: nothing is dropped


def test_bootstrap_interval_of_the_iqm_against_the_exact_bootstrap_distribution():
    """Values: seven 0s and one 10. A bootstrap resample holds k tens, k ~ Binomial(8, 1/8); sorted, its middle four
    (positions 2-5) hold max(0, k - 2) of them, so IQM = 2.5 max(0, k - 2) (capped at 10). P(k <= 2) = 0.933 and
    P(k <= 3) = 0.989, so the exact 2.5% and 97.5% quantiles are 0 and 2.5. The plain mean's would be 0 and 3.75."""
    values = [0.0] * 7 + [10.0]
    probability = {k: math.comb(8, k) * (1 / 8) ** k * (7 / 8) ** (8 - k) for k in range(9)}
    iqm_of = {k: 2.5 * min(max(k - 2, 0), 4) for k in range(9)}

    def exact_quantile(q):
        cumulative = 0.0
        for k in range(9):
            cumulative += probability[k]
            if cumulative >= q:
                return iqm_of[k]

    assert (exact_quantile(0.025), exact_quantile(0.975)) == (0.0, 2.5)
    low, high = reproduce.bootstrap_interval(values, resamples=20_000)
    assert (low, high) == (0.0, 2.5)
    # A sample with no spread has a zero-width interval.
    assert reproduce.bootstrap_interval([3.0, 3.0, 3.0]) == (3.0, 3.0)


def test_published_numbers_are_those_of_the_task_and_the_picture_keeps_those_within_its_steps():
    """Every task of the harness has published rows; the picture marks only those within 1.2 x the runs' last step
    (a 1M-step point would squash a 100k-step curve), and both lists run from the fewest steps."""
    for task in ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5"):
        every = reproduce.published_for(task)
        assert every and all(row["task"] == task.split("-v")[0] for row in every)
        assert [int(row["steps"]) for row in every] == sorted(int(row["steps"]) for row in every)
        in_range = reproduce.published_for(task, max_steps=120_000)
        assert in_range and {int(row["steps"]) for row in in_range} == {100_000}
        assert len(in_range) < len(every)
