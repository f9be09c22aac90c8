"""Tests of benchmarks/reproduce.py: the harness end to end through its command line (submitit's local executor, the
same code path as Slurm), reruns, failures, and the statistics against hand computations; the published curves of
benchmarks/published/ at matched environment steps; the Stable-Baselines3 peer (benchmarks/sb3_peer.py); the speed
benchmark's argument checks (benchmarks/speed.py)."""

import csv
import glob
import json
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
                           total_timesteps=1400, output_dir=str(tmp_path / "out"), final_eval_episodes=0)
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


def test_a_run_stopped_after_its_final_checkpoint_is_finished_not_resumed(tmp_path):
    """Killed after the final checkpoint but before done.json: the rerun does not resume (there is nothing left to
    train, and the script would refuse a --total-timesteps that does not exceed the checkpoint's step) but collects the
    evaluations the run logged and marks it finished."""
    plan = SimpleNamespace(scripts=["sac_continuous.py"], datasets=[], env_ids=["Pendulum-v1"], seeds=[1],
                           total_timesteps=600, output_dir=str(tmp_path / "out"))
    run = reproduce.plan_runs(plan, [*SHORT, "--hidden-dim", "32"])[0]
    first = reproduce.Execute()(reproduce.asdict(run), 1)
    assert first["returncode"] == 0 and first["resumed_from"] is None
    os.remove(os.path.join(run.folder, "done.json"))
    os.remove(os.path.join(run.folder, "evaluations.csv"))
    again = reproduce.Execute()(reproduce.asdict(run), 1)
    assert again["returncode"] == 0 and again["resumed_from"] == 600
    assert "nothing left to train" in open(os.path.join(run.folder, "log.txt")).read()
    rows = list(csv.DictReader(open(os.path.join(run.folder, "evaluations.csv"))))
    assert [row["step"] for row in rows] == ["500", "600"] and os.path.exists(os.path.join(run.folder, "done.json"))


def test_offline_scripts_get_their_dataset_and_step_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "replay.npz").write_bytes(b"")
    plan = SimpleNamespace(scripts=["decision_transformer.py"], datasets=["data/replay.npz", "mujoco/hopper/medium-v0"],
                           env_ids=[], seeds=[1, 2], total_timesteps=300, output_dir=str(tmp_path / "out"),
                           final_eval_episodes=100)
    runs = reproduce.plan_runs(plan, ["--batch-size", "8"])
    assert len(runs) == 4
    first = runs[0].command
    dataset = str(tmp_path / "data" / "replay.npz")  # absolute: each run works in its own folder
    assert first[1:] == [os.path.join(ROOT, "decision_transformer.py"), "--dataset", dataset, "--seed", "1",
                         "--total-steps", "300", "--save-model", "--batch-size", "8"]
    assert runs[0].task == "data/replay.npz"  # the tables name it as the user did, on any machine
    assert first[0] == sys.executable and {run.final_episodes for run in runs} == {100}
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


# ----------------------------------------------------------------------------------------------------------------------
# Published curves (benchmarks/published/) at matched environment steps
# ----------------------------------------------------------------------------------------------------------------------
def only_curve(task: str, algorithm: str, source: str) -> "reproduce.Curve":
    curves = [curve for curve in reproduce.published_curves(task, [algorithm]) if curve.meta["source"] == source]
    assert len(curves) == 1, curves
    return curves[0]


def test_tianshou_curves_count_the_random_warm_up_in_their_environment_steps():
    """Tianshou's x-axis starts after its random warm-up (10k SAC, 25k TD3): its rows x = 90000 (SAC) and x = 75000
    (TD3) of HalfCheetah-v3/*/test_rew_10seeds.csv (rew, rew:shaded: 6212.7888, 437.2369 and 4715.3097, 387.332)
    are the evaluations at 100k environment steps."""
    sac = only_curve("HalfCheetah-v5", "sac", "Tianshou benchmark")
    step, x, values = reproduce.value_at(sac, 100_000)
    assert (step, x) == (100_000, 90_000)
    assert values.mean() == pytest.approx(6212.7888, abs=1e-3) and values.std() == pytest.approx(437.2369, abs=1e-3)
    td3 = only_curve("HalfCheetah-v5", "td3", "Tianshou benchmark")
    step, x, values = reproduce.value_at(td3, 100_000)
    assert (step, x) == (100_000, 75_000)
    assert values.mean() == pytest.approx(4715.3097, abs=1e-3) and values.std() == pytest.approx(387.332, abs=1e-3)
    assert [int(s) for s in sac.env_steps[:3]] == [10_000, 15_000, 20_000]  # x = 0: the untrained policy after 10k


def test_td3_authors_curves_put_evaluation_k_at_5000_k_environment_steps():
    """sfujim/TD3's arrays: index 0 is the untrained policy (step 0), index k the evaluation at 5000 k steps; index 20
    of the ten HalfCheetah seeds has mean 5513.5 and population std 553.7 (numpy on the .npy files)."""
    curve = only_curve("HalfCheetah-v5", "td3", "TD3 authors' learning curves")
    assert curve.values.shape == (201, 10) and int(curve.env_steps[-1]) == 1_000_000
    step, index, values = reproduce.value_at(curve, 100_000)
    assert (step, index) == (100_000, 20)
    assert round(values.mean(), 1) == 5513.5 and round(values.std(), 1) == 553.7
    assert reproduce.value_at(curve, 0)[:2] == (0, 0)


@pytest.mark.parametrize("task, best, spread", [("HalfCheetah-v5", 9636.95, 859.065), ("Hopper-v5", 3564.07, 114.74),
                                                 ("Walker2d-v5", 4682.82, 539.64)])
def test_best_of_the_mean_curve_is_the_td3_papers_max_average_return(task, best, spread):
    """The TD3 paper's Table 1 ("max average return over 10 trials") is the highest point of the authors' 10-seed mean
    curve, +- the population std over the seeds there: best_of_mean_curve gives it from their per-seed curves. (The
    mean of each seed's own maximum, 9771.6 on HalfCheetah, is not it.) A step that not every seed reached is left
    out."""
    curve = only_curve(task, "td3", "TD3 authors' learning curves")
    rows = [dict(seed=seed, step=int(step), episodic_return=value) for step, values in zip(curve.env_steps, curve.values)
            for seed, value in enumerate(values)]
    step, mean, std = reproduce.best_of_mean_curve(rows)
    assert (round(mean, 2), round(std, 3 if task == "HalfCheetah-v5" else 2)) == (best, spread)
    assert step in (975_000, 970_000, 980_000)
    step, mean, std = reproduce.best_of_mean_curve(rows + [dict(seed=0, step=1_005_000, episodic_return=1e6)])
    assert mean == pytest.approx(best, abs=0.01)


def test_matching_takes_the_nearest_evaluation_not_after_our_step():
    """No interpolation, nothing from after our step: at 98000 steps Tianshou's SAC gives its evaluation at 95000
    environment steps (x = 85000, mean 6106.3958), not the one at 100000; before a curve's first evaluation
    (Tianshou's TD3 on HalfCheetah starts at x = 5000, i.e. 30000 steps) there is nothing to compare."""
    sac = only_curve("HalfCheetah-v5", "sac", "Tianshou benchmark")
    step, x, values = reproduce.value_at(sac, 98_000)
    assert (step, x) == (95_000, 85_000) and values.mean() == pytest.approx(6106.3958, abs=1e-3)
    td3 = only_curve("HalfCheetah-v5", "td3", "Tianshou benchmark")
    assert reproduce.value_at(td3, 29_999) is None
    step, x, values = reproduce.value_at(td3, 30_000)
    assert (step, x) == (30_000, 5_000) and values.mean() == pytest.approx(-491.7738, abs=1e-3)


def test_the_bands_are_the_mean_and_population_std_over_the_seeds_as_tianshou_drew_them():
    """Tianshou's files carry their own mean and shaded (np.std) columns beside the ten seeds: the band of every
    stored Tianshou curve reproduces both at every evaluation (the seeds are rounded to 4 decimals there)."""
    for path in sorted(glob.glob(os.path.join(reproduce.PUBLISHED_CURVES, "tianshou_*.csv"))):
        curve = reproduce.read_curve(path)
        table = list(csv.DictReader(line for line in open(path) if not line.startswith("#")))
        steps, mean, spread = reproduce.curve_band(curve)
        assert len(steps) == len(table) > 200
        assert np.allclose(mean, [float(row["source_mean"]) for row in table], atol=2e-3), path
        assert np.allclose(spread, [float(row["source_std"]) for row in table], atol=2e-3), path
        assert reproduce.curve_band(curve, 100_000)[0][-1] == 100_000  # up to the runs' last step


def test_published_rows_read_off_a_curve_agree_with_it_at_their_steps():
    """The 100k rows of published.csv that came from these curves (their `curve` column) hold the curve's mean and
    std at that environment step; the table and the picture show them through the curve, not again as points."""
    with open(reproduce.PUBLISHED) as file:
        rows = [row for row in csv.DictReader(file) if row["curve"]]
    assert len(rows) == 9  # Tianshou SAC and TD3, the TD3 authors: HalfCheetah, Hopper, Walker2d
    for row in rows:
        curve = reproduce.read_curve(os.path.join(reproduce.PUBLISHED_CURVES, row["curve"]))
        step, _, values = reproduce.value_at(curve, int(row["steps"]))
        assert step == int(row["steps"])
        assert values.mean() == pytest.approx(float(row["return"]), abs=0.06), row
        assert values.std() == pytest.approx(float(row["spread"]), abs=0.06), row
    for task in ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5"):
        assert all(not row["curve"] for row in reproduce.published_points(task))
        assert {int(row["steps"]) for row in reproduce.published_points(task)} == {1_000_000}


def test_difference_interval_resamples_each_group_on_its_own():
    """Bootstrap of mean(a) - mean(b). a = b = [0, 10]: each resampled mean is 0, 5 or 10 with probabilities 1/4, 1/2,
    1/4, so the difference is -10 with probability 1/16 > 2.5% and +10 likewise: the interval is [-10, 10] (resampling
    the two as pairs would give [0, 0]). Against a constant group the interval is that of the other group's mean."""
    assert reproduce.difference_interval([0.0, 10.0], [0.0, 10.0]) == (-10.0, 10.0)
    assert reproduce.difference_interval([0.0, 10.0], [0.0, 0.0, 0.0]) == (0.0, 10.0)
    assert reproduce.difference_interval([5.0, 5.0, 5.0], [2.0, 2.0]) == (3.0, 3.0)


def synthetic_rows(task: str, returns: dict) -> list:
    """Evaluation rows of finished runs: label -> per-seed final returns at step 100000 (and 50000, half of it)."""
    return [dict(script=label + ("" if label in reproduce.PEERS else ".py"), label=label, task=task, seed=seed,
                 step=step, episodic_return=value * step / 100_000, normalized_score="")
            for label, values in returns.items() for seed, value in enumerate(values, 1) for step in (50_000, 100_000)]


def test_the_table_compares_with_the_curves_at_matched_steps_and_with_a_peer():
    rows = synthetic_rows("HalfCheetah-v5", {"sac_continuous": [6000.0, 6000.0, 6000.0],
                                             "sb3_sac": [5000.0, 5000.0, 5000.0]})
    table = reproduce.markdown_table("HalfCheetah-v5", rows)
    assert ("| sac_continuous | sb3_sac | 100000 | 3 vs 3 | 6000.0 +- 0.0 | 5000.0 +- 0.0 | "
            "+1000.0 [+1000.0, +1000.0] |") in table
    # Tianshou's SAC at 100k environment steps (x = 90000): 6212.8 +- 437.2 over 10 seeds; 6000 - 6212.7888 = -212.8,
    # -212.7888 / 437.2369 = -0.49 published std. Both our labels are SAC; no TD3 curve in a SAC-only table.
    assert ("| sac_continuous | 100000 | 6000.0 +- 0.0 | Tianshou benchmark (HalfCheetah-v3) | 100000 (x = 90000) | "
            "10 | 6212.8 +- 437.2 | -212.8 [") in table
    assert table.count("| 100000 (x = 90000) |") == 2 and "-0.49 |" in table
    assert "TD3 authors" not in table and "75000" not in table
    assert "| sac_continuous | 100000 | 3 | 6000.0 +- 0.0 | 6000.0 [6000.0, 6000.0] | - | 6000.0 +- 0.0 (100000) |" in table
    points = table.split("Published points")[1]
    assert "Tianshou" not in points and "CleanRL sac_continuous_action.py" in points


def test_the_picture_draws_the_published_curves_of_its_algorithms_behind_ours(tmp_path, monkeypatch):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # text stays text in the SVG
    rows = synthetic_rows("Hopper-v5", {"td3_continuous": [400.0, 300.0], "sb3_td3": [350.0, 250.0]})
    reproduce.plot("Hopper-v5", rows, str(tmp_path / "hopper"))
    svg = (tmp_path / "hopper.svg").read_text()
    assert "TD3 authors' learning curves TD3 (Hopper-v1, 10 seeds), mean +- std" in svg
    assert "Tianshou benchmark TD3 (Hopper-v3, 10 seeds), mean +- std" in svg and "SAC (Hopper" not in svg
    assert "sb3_td3 (2 seeds)" in svg and "td3_continuous (2 seeds)" in svg


# ----------------------------------------------------------------------------------------------------------------------
# The SB3 peer (benchmarks/sb3_peer.py)
# ----------------------------------------------------------------------------------------------------------------------
def test_sb3_peer_gives_sb3_our_default_hyperparameters():
    import sac_continuous
    import sb3_peer
    import td3_continuous
    import torch

    def widths(module) -> list:
        return [layer.out_features for layer in module.modules() if isinstance(layer, torch.nn.Linear)]

    ours = sac_continuous.Args()
    args = sb3_peer.parse_args(["--algo", "sac", "--env-id", "Pendulum-v1"])
    model = sb3_peer.build_model(args, sb3_peer.make_env("Pendulum-v1", 1))
    assert (model.learning_rate, model.learning_starts, model.batch_size, model.tau, model.gamma) == (
        ours.policy_lr, ours.learning_starts, ours.batch_size, ours.tau, ours.gamma)
    assert ours.policy_lr == ours.q_lr == ours.alpha_lr
    assert model.ent_coef_optimizer.param_groups[0]["lr"] == ours.alpha_lr
    assert model.buffer_size == min(ours.buffer_size, ours.total_timesteps)
    assert model.log_ent_coef.detach().exp().item() == pytest.approx(ours.initial_alpha)
    assert model.target_entropy == -1.0  # -dim(A) on Pendulum
    assert (model.train_freq.frequency, model.gradient_steps, model.target_update_interval) == (1, 1, 1)
    hidden = [ours.hidden_dim, ours.hidden_dim]
    assert widths(model.actor.latent_pi) == hidden and widths(model.critic.qf0) == [*hidden, 1]

    ours = td3_continuous.Args()
    args = sb3_peer.parse_args(["--algo", "td3", "--env-id", "Pendulum-v1"])
    model = sb3_peer.build_model(args, sb3_peer.make_env("Pendulum-v1", 1))
    assert ours.policy_lr == ours.q_lr and (model.learning_rate, model.learning_starts, model.batch_size) == (
        ours.policy_lr, ours.learning_starts, ours.batch_size)
    assert (model.tau, model.gamma, model.policy_delay) == (ours.tau, ours.gamma, ours.policy_frequency)
    assert (model.target_policy_noise, model.target_noise_clip) == (ours.policy_noise, ours.noise_clip)
    assert np.all(model.action_noise._sigma == ours.exploration_noise)  # in [-1, 1] units, as ours
    assert widths(model.actor.mu) == [*ours.hidden_dims, 1] and widths(model.critic.qf0) == [*ours.hidden_dims, 1]
    assert sb3_peer.parse_args(["--algo", "td3", "--batch-size", "100"]).batch_size == 100  # our flags override


def test_sb3_peer_rejects_settings_sb3_cannot_express(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sb3_peer.py"), "--algo", "sac",
                             "--env-id", "Pendulum-v1", "--q-lr", "1e-3", "--total-timesteps", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("sb3_peer.py: error: SB3's SAC has one learning rate")


@pytest.mark.parametrize("flags, message", [
    (["--timed-steps", "2000", "--warmup-updates", "300"], "--timed-steps must be a multiple of --warmup-updates"),
    (["--warmup-updates", "0"], "--repeats, --warmup-updates and --timed-steps must be at least 1"),
])
def test_speed_benchmark_rejects_timings_it_cannot_measure_before_running_anything(tmp_path, flags, message):
    """speed.py reads the timed interval off charts/SPS, logged every --warmup-updates steps; a timing that does not
    fit must stop at once with one line, not after minutes of runs with a traceback."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--no-sb3", "--no-compile",
                             "--repeats", "1", *flags], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"speed.py: error: {message}")
    assert "Traceback" not in result.stderr


def test_sb3_peer_evaluates_with_our_protocol():
    """The same policy (the action 0, mid-range, for every state) evaluated by sb3_peer.evaluate and by
    sac_continuous.evaluate gives the same returns: episode i of an evaluation resets with seed + i."""
    import gymnasium as gym
    import sac_continuous
    import sb3_peer
    import torch

    class Zero:
        def predict(self, obs, deterministic):
            assert deterministic
            return np.zeros(1, dtype=np.float32), None

    actor = sac_continuous.Actor(3, 1, 8, -20.0, 2.0)
    torch.nn.init.zeros_(actor.head.weight), torch.nn.init.zeros_(actor.head.bias)  # tanh(mean) = 0
    seeds = []

    class Recorded(gym.Wrapper):
        def reset(self, **kwargs):
            seeds.append(kwargs.get("seed"))
            return self.env.reset(**kwargs)

    peer = sb3_peer.evaluate(Zero(), Recorded(gym.make("Pendulum-v1")), 3, 10_001)
    assert seeds == [10_001, 10_002, 10_003]
    ours = sac_continuous.evaluate(actor, gym.make("Pendulum-v1"), 3, 10_001, torch.device("cpu"))
    assert np.array_equal(peer, ours) and len(set(peer)) == 3  # three different start states


def test_sb3_peers_run_through_the_harness_beside_our_script(tmp_path):
    output = tmp_path / "results"
    command = ["--scripts", "sac_continuous.py", "sb3_sac", "sb3_td3", "--env-ids", "Pendulum-v1", "--seeds", "1",
               "2", "--total-timesteps", "600", "--workers", "2", "--output-dir", str(output), "--",
               "--learning-starts", "200", "--eval-every", "300", "--eval-episodes", "2", "--log-every", "300",
               "--batch-size", "32"]
    result = harness(*command, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "runs done 6/6 (0 failed)" in result.stdout
    log = (output / "jobs" / "sb3_td3" / "Pendulum-v1" / "seed2" / "log.txt").read_text()
    assert log.splitlines()[0].split()[1:6] == [os.path.join(ROOT, "benchmarks", "sb3_peer.py"), "--algo", "td3",
                                                "--env-id", "Pendulum-v1"]
    assert "saved model to runs/" in log and "sb3_td3.zip" in log
    rows = list(csv.DictReader(open(output / "evaluations.csv")))
    assert {(row["label"], row["seed"], row["step"]) for row in rows} == {
        (label, seed, step) for label in ("sac_continuous", "sb3_sac", "sb3_td3") for seed in ("1", "2")
        for step in ("300", "600")}
    table = (output / "Pendulum-v1.md").read_text()
    assert "| sb3_sac | 600 | 2 |" in table and "| sb3_td3 | 600 | 2 |" in table
    peer = [line for line in table.splitlines() if line.startswith("| sac_continuous | sb3_sac | 600 | 2 vs 2 |")]
    final = {label: np.mean([float(row["episodic_return"]) for row in rows if row["label"] == label
                             and row["step"] == "600"]) for label in ("sac_continuous", "sb3_sac")}
    assert len(peer) == 1 and f"| {final['sac_continuous'] - final['sb3_sac']:+.1f} [" in peer[0]
    assert (output / "Pendulum-v1.png").read_bytes().startswith(b"\x89PNG")


# Flags of a tiny Decision Transformer (a few steps on the 300-step InvertedPendulum set of conftest.py).
TINY_DT = ["--context-len", "4", "--embed-dim", "16", "--n-layers", "1", "--batch-size", "8", "--warmup-steps", "5",
           "--eval-every", "10", "--eval-episodes", "1", "--log-every", "10"]
TINY_DD = ["--horizon", "8", "--dim", "16", "--dim-mults", "1", "2", "--n-diffusion-steps", "10", "--batch-size", "16",
           "--eval-every", "10", "--eval-episodes", "1", "--log-every", "10", "--sampler", "ddim", "--sampling-steps",
           "5", "--test-return", "0.7"]


def test_offline_runs_end_with_a_final_evaluation_of_their_model(tmp_path, inverted_pendulum_random_npz):
    """--final-eval-episodes evaluates each finished offline run's model through the script's evaluation-only mode.
    With as many episodes as the run's own evaluations, it must give exactly the run's final evaluation (the same
    model, the same start states), one row per target for the Decision Transformer, one for the Diffuser; the tables
    show it and the data's mean return. The Diffuser's run samples with DDIM and another return condition, which its
    evaluation-only mode takes from the command line: the final evaluation must repeat them."""
    output = tmp_path / "results"
    for script, flags in (("decision_transformer.py", TINY_DT), ("decision_diffuser.py", TINY_DD)):
        result = harness("--scripts", script, "--datasets", inverted_pendulum_random_npz, "--seeds", "1",
                         "--total-timesteps", "20", "--final-eval-episodes", "1", "--output-dir", str(output), "--",
                         *flags, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    for script, labels in (("decision_transformer", 2), ("decision_diffuser", 1)):
        folder = output / "jobs" / script / "random" / "seed1"
        rows = list(csv.DictReader(open(folder / "evaluations.csv")))
        final = list(csv.DictReader(open(folder / "final_evaluation.csv")))
        assert len(final) == labels and {row["episodes"] for row in final} == {"1"}
        for row in final:
            logged = [r for r in rows if r["label"] == row["label"] and r["step"] == "20"]
            assert len(logged) == 1 and float(row["episodic_return"]) == pytest.approx(
                float(logged[0]["episodic_return"]), rel=1e-6), (row, logged)
        assert "--eval-checkpoint" in (folder / "log.txt").read_text()
    with np.load(inverted_pendulum_random_npz) as data:
        episodes = np.split(data["rewards"], np.flatnonzero(data["terminals"] | data["timeouts"]) + 1)[:-1]  # complete
        data_mean = np.mean([episode.sum(dtype=np.float64) for episode in episodes])
    result = harness("--scripts", "decision_transformer.py", "decision_diffuser.py", "--datasets",
                     inverted_pendulum_random_npz, "--seeds", "1", "--total-timesteps", "20", "--output-dir",
                     str(output), "--aggregate-only", cwd=tmp_path)
    table = (output / "random.md").read_text()
    assert "| decision_diffuser | 20 | 1 | 1 |" in table and "| decision_transformer (target " in table
    assert f"The data: mean episode return {data_mean:.1f}" in table


def test_the_d3rlpy_peer_needs_its_own_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("D3RLPY_PYTHON", raising=False)
    result = harness("--scripts", "decision_transformer.py", "d3rlpy_dt", "--datasets", "x.npz", "--seeds", "1",
                     "--total-timesteps", "20", "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == (
        "reproduce.py: error: d3rlpy_dt runs in its own environment: set D3RLPY_PYTHON to its Python (see "
        "benchmarks/d3rlpy_peer.py)")


def test_d3rlpy_peer_evaluates_with_our_protocol(inverted_pendulum_random_npz):
    """The same policy (the action 0 for every input) evaluated by d3rlpy_peer.evaluate (through a stand-in for
    d3rlpy's stateful wrapper) and by decision_transformer.evaluate gives the same returns, target by target: episode
    i resets with seed + 10000 + i in both. Needs no d3rlpy."""
    import d3rlpy_peer
    import decision_transformer as dt
    import torch

    data = dt.load_dataset(inverted_pendulum_random_npz)
    task = dt.dataset_task(data, dt.Args(dataset=inverted_pendulum_random_npz))
    wrappers = []

    class Wrapper:
        def __init__(self, target):
            self.target, self.calls, self.resets = target, 0, 0

        def predict(self, obs, reward):
            self.calls += 1
            return np.zeros(1, np.float32)

        def reset(self):
            self.resets += 1

    class Algo:
        def as_stateful_wrapper(self, target_return):
            wrappers.append(Wrapper(target_return))
            return wrappers[-1]

    peer = d3rlpy_peer.evaluate(Algo(), dt, task, 3, 7)
    model = dt.DecisionTransformer(task["obs_dim"], task["act_dim"], [-3.0], [3.0], 16, 1, 1, 0.0, 1000)
    torch.nn.init.zeros_(model.predict_action.weight), torch.nn.init.zeros_(model.predict_action.bias)
    env_fn = lambda: dt.make_env(task["env_id"], 7)  # noqa: E731
    ours = dt.evaluate(model, env_fn, task["target_returns"], 3, 7 + 10_000, task["state_mean"], task["state_std"],
                       1.0, 4, 1000, torch.device("cpu"))
    assert [w.target for w in wrappers] == task["target_returns"] and [w.resets for w in wrappers] == [3, 3]
    assert np.array_equal(peer, ours) and len(set(peer[0])) == 3  # three different start states


@pytest.mark.skipif(not os.path.isfile(os.environ.get("D3RLPY_PYTHON", "")),
                    reason="needs d3rlpy in its own environment: set D3RLPY_PYTHON (benchmarks/d3rlpy_peer.py)")
def test_d3rlpy_peer_runs_through_the_harness_beside_our_decision_transformer(tmp_path, inverted_pendulum_random_npz):
    """d3rlpy's DT gets our settings (read back from the model it saved) and is tabled against ours, target by
    target, with its final evaluation."""
    output = tmp_path / "results"
    result = harness("--scripts", "decision_transformer.py", "d3rlpy_dt", "--datasets", inverted_pendulum_random_npz,
                     "--seeds", "1", "--total-timesteps", "20", "--final-eval-episodes", "2", "--workers", "2",
                     "--output-dir", str(output), "--", *TINY_DT, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = output / "jobs" / "d3rlpy_dt" / "random" / "seed1"
    model = glob.glob(str(folder / "runs" / "*" / "d3rlpy_dt_20.d3"))[0]  # the model of the last checkpoint
    config = subprocess.run([os.environ["D3RLPY_PYTHON"], "-c", "import d3rlpy, json, sys; c = d3rlpy.load_learnable("
                             "sys.argv[1]).config; o = c.optim_factory; print(json.dumps([c.context_size, "
                             "c.batch_size, c.learning_rate, c.num_heads, c.num_layers, c.attn_dropout, c.resid_dropout, "
                             "c.embed_dropout, c.max_timestep, c.encoder_factory.hidden_units, o.weight_decay, "
                             "o.clip_grad_norm, o.lr_scheduler_factory.warmup_steps, c.reward_scaler.multiplier]))",
                             model], capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    assert json.loads(config) == [4, 8, 1e-4, 1, 1, 0.1, 0.1, 0.1, 1000, [16], 1e-4, 0.25, 5, 0.001]
    final = list(csv.DictReader(open(folder / "final_evaluation.csv")))
    assert len(final) == 2 and {row["episodes"] for row in final} == {"2"}
    table = (output / "random.md").read_text()
    assert table.count("| decision_transformer (target ") >= 2 and table.count("| d3rlpy_dt (target ") >= 4
    assert len([line for line in table.splitlines() if line.startswith("| decision_transformer (target ")
                and "| d3rlpy_dt (target " in line]) == 2  # ours against the peer, for each target


@pytest.mark.skipif(not os.path.isfile(os.environ.get("D3RLPY_PYTHON", "")),
                    reason="needs d3rlpy in its own environment: set D3RLPY_PYTHON (benchmarks/d3rlpy_peer.py)")
def test_an_interrupted_d3rlpy_peer_run_resumes_exactly(tmp_path, inverted_pendulum_random_npz):
    """10 steps, then --resume to 20, evaluates at step 20 exactly as 20 steps in one go: the checkpoint keeps the
    networks, the optimiser and its warm-up, the scalers and the random generators of the windows and dropout."""
    peer = [os.environ["D3RLPY_PYTHON"], os.path.join(ROOT, "benchmarks", "d3rlpy_peer.py"), "--dataset",
            inverted_pendulum_random_npz, "--save-model", *TINY_DT]
    evaluations = lambda out: [line for line in out.splitlines() if line.startswith("eval at step 20")]  # noqa: E731
    (tmp_path / "once").mkdir(), (tmp_path / "twice").mkdir()
    once = subprocess.run([*peer, "--total-steps", "20"], cwd=tmp_path / "once", capture_output=True, text=True)
    first = subprocess.run([*peer, "--total-steps", "10"], cwd=tmp_path / "twice", capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    checkpoint = glob.glob(str(tmp_path / "twice" / "runs" / "*" / "d3rlpy_dt.pt"))[0]
    second = subprocess.run([*peer, "--total-steps", "20", "--resume", checkpoint], cwd=tmp_path / "twice",
                            capture_output=True, text=True)
    assert second.returncode == 0 and "resumed at step 10" in second.stdout, second.stderr
    assert len(evaluations(once.stdout)) == 2 and evaluations(second.stdout) == evaluations(once.stdout)
    assert sorted(os.listdir(os.path.dirname(checkpoint)))[:2] == ["d3rlpy_dt.pt", "d3rlpy_dt_20.d3"]
    models = [glob.glob(str(tmp_path / run / "runs" / "*" / "d3rlpy_dt_20.d3"))[0] for run in ("once", "twice")]
    compare = ("import d3rlpy, sys, torch; a, b = (d3rlpy.load_learnable(p).impl.modules for p in sys.argv[1:]); "
               "print(all(torch.equal(x, y) for x, y in zip(a.transformer.state_dict().values(), "
               "b.transformer.state_dict().values())) and a.optim.state_dict()['lr_scheduler'] == "
               "b.optim.state_dict()['lr_scheduler'])")
    same = subprocess.run([os.environ["D3RLPY_PYTHON"], "-c", compare, *models], capture_output=True, text=True)
    assert same.stdout.strip().splitlines()[-1:] == ["True"], same.stdout + same.stderr  # the weights, bit for bit


def test_the_datas_mean_return_counts_complete_episodes_only(tmp_path):
    """Episodes end at terminals | timeouts; an unfinished last one is left out (as the offline scripts' targets
    do), and the score uses the file's own references: returns 3 and 4 (the trailing 5 is cut), mean 3.5, 35.0."""
    path = str(tmp_path / "data.npz")
    np.savez(path, rewards=np.array([1, 1, 1, 2, 2, 5], np.float32), terminals=np.array([0, 0, 1, 0, 0, 0], bool),
             timeouts=np.array([0, 0, 0, 0, 1, 0], bool), ref_scores=np.array([0.0, 10.0]))
    assert reproduce.data_returns(path) == (3.5, 35.0)
    assert reproduce.data_returns("mujoco/hopper/medium-v0") is None  # a Minari id: no file to read
