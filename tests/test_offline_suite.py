"""benchmarks/offline_suite.py and benchmarks/agents.py: a tiny suite made by the real command from tiny agents made
by the real scripts, read back through Minari's own API and both offline scripts, with the recipe's invariants."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_minari_equals_npz, background, run_script

SUITE, AGENTS = os.path.join(ROOT, "benchmarks", "offline_suite.py"), os.path.join(ROOT, "benchmarks", "agents.py")
KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
TINY_SAC = ["--learning-starts", "200", "--hidden-dim", "32", "--batch-size", "32", "--eval-episodes", "1", "--no-cuda"]
TINY_TD3 = ["--learning-starts", "200", "--hidden-dims", "32", "32", "--batch-size", "32", "--eval-episodes", "1",
            "--no-cuda"]
TASKS = {"hopper": ("Hopper-v5", 1000), "pendulum": ("Pendulum-v1", 600)}  # (env, steps of the medium SAC run)
STEPS = 1500  # of each medium and expert set


def run_tool(path: str, *args: str, cwd: str, env: dict | None = None, check: bool = True):
    result = subprocess.run([sys.executable, path, *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{path} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def one_line_error(result, fragment: str):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and fragment in lines[0], result.stderr


def make_tiny_suite(folder):
    """Per task, a 1000/600-step SAC run (its training transitions exported by the script itself, --export-replay)
    and a 500-step TD3 run, released as the task's medium and expert agents; then the suite for Hopper-v5 (episodes end
    by termination) and Pendulum-v1 (every episode truncated at 200 steps). Pendulum's medium run is first taken to
    step 400 in the suite's own work folder, so the suite resumes it rather than rerunning it."""
    pytest.importorskip("minari")
    folder = Path(folder)
    env = {"MINARI_DATASETS_PATH": str(folder / "minari")}
    for task, (env_id, steps) in TASKS.items():
        sac = [*TINY_SAC, "--env-id", env_id, "--eval-every", str(steps)]
        os.makedirs(folder / f"{task}-sac")
        run_script("sac_continuous.py", *sac, "--total-timesteps", str(steps), "--save-model", "--export-replay",
                   "replay.npz", cwd=str(folder / f"{task}-sac"))
        os.makedirs(folder / f"{task}-td3")
        run_script("td3_continuous.py", *TINY_TD3, "--env-id", env_id, "--total-timesteps", "500", "--eval-every",
                   "500", "--save-model", cwd=str(folder / f"{task}-td3"))
        for script, name in [("sac_continuous", "sac-medium"), ("td3_continuous", "td3-1m")]:
            checkpoint = glob.glob(str(folder / f"{task}-{script[:3]}" / "runs" / "*" / f"{script}.pt"))[0]
            run_tool(AGENTS, "release", checkpoint, "--name", f"{task}-{name}", "--commit", "test", "--command",
                     "tiny", "--folder", str(folder / "agents"), cwd=str(folder))
    work = folder / "out" / "work" / "pendulum-medium-run"
    os.makedirs(work)
    run_script("sac_continuous.py", *TINY_SAC, "--env-id", "Pendulum-v1", "--eval-every", "600", "--total-timesteps",
               "400", "--save-model", cwd=str(work))
    command = ["--output-dir", "out", "--tasks", "hopper", "Pendulum-v1", "--agents", "agents", "--steps", str(STEPS),
               "--namespace", "test"]
    result = run_tool(SUITE, *command, cwd=str(folder), env=env)
    return SimpleNamespace(folder=folder, out=folder / "out", env=env, stdout=result.stdout, command=command)


pytestmark = pytest.mark.background(job=make_tiny_suite)  # every test here uses it


@pytest.fixture
def tiny_suite():
    return background(make_tiny_suite)


def load(suite, task: str, name: str) -> dict:
    with np.load(suite.out / f"{task}-{name}-v0.npz") as data:
        return {key: data[key] for key in data.files}


def test_medium_replay_is_the_medium_runs_transitions_in_order(tiny_suite):
    """medium-replay, read from the medium run's replay buffer (rerun for Hopper, resumed from step 400 for Pendulum),
    equals what the script itself exported of its training transitions, row for row: observations, actions in the
    env's units, rewards, and episode ends recovered from a buffer that stores no truncation."""
    for task in TASKS:
        data = load(tiny_suite, task, "medium-replay")
        with np.load(tiny_suite.folder / f"{task}-sac" / "replay.npz") as exported:
            for key in KEYS:
                assert data[key].dtype == exported[key].dtype, key
                np.testing.assert_array_equal(data[key], exported[key], err_msg=f"{task} {key}")
    assert "--resume" in open(tiny_suite.out / "work" / "pendulum-medium-replay-v0.log").read()
    assert tiny_suite.stdout.count("the medium run's policy is the released medium agent, bit for bit") == 2


def test_medium_expert_is_medium_then_expert(tiny_suite):
    """Row for row medium up to its last complete episode, then all of expert (D4RL's stitch_dataset.py): the episode
    that the end of collection cut in medium is dropped."""
    for task in TASKS:
        medium, expert, both = (load(tiny_suite, task, name) for name in ("medium", "expert", "medium-expert"))
        assert len(medium["rewards"]) == len(expert["rewards"]) == STEPS
        keep = np.flatnonzero(medium["terminals"] | medium["timeouts"])[-1] + 1
        for key in KEYS:
            np.testing.assert_array_equal(both[key], np.concatenate([medium[key][:keep], expert[key]]),
                                          err_msg=f"{task} {key}")
        assert keep < STEPS or task == "hopper"  # Pendulum: 1500 = 7 x 200 + 100 steps, the last 100 dropped


def test_episode_ends_are_kept_and_minari_holds_the_same_episodes(tiny_suite, monkeypatch):
    """Pendulum: every episode is truncated at 200 steps, none terminates; Hopper: episodes terminate. Every set read
    through Minari's own API holds the .npz's episodes, one end flag at each episode's last step, with the env, the
    references and the algorithm in its metadata."""
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_suite.env["MINARI_DATASETS_PATH"])
    for name in ("medium-replay", "medium", "expert", "medium-expert"):
        data = load(tiny_suite, "pendulum", name)
        lengths = np.diff(np.r_[-1, np.flatnonzero(data["timeouts"])])
        expected = {"medium-replay": 3, "medium": 7, "expert": 7, "medium-expert": 14}[name]
        assert not data["terminals"].any() and lengths.tolist() == [200] * expected, name
        dataset = minari.load_dataset(f"test/pendulum/{name}-v0")
        episodes = list(dataset.iterate_episodes())
        assert sum(len(e.rewards) for e in episodes) == len(data["rewards"])
        assert all(e.truncations[-1] and not e.terminations.any() for e in episodes), name
        hopper = load(tiny_suite, "hopper", name)
        assert hopper["terminals"].sum() >= 10 and not hopper["timeouts"].any(), name
        algorithm = {"expert": "TD3", "medium-expert": "SAC (sac_continuous.py) then TD3"}.get(name, "SAC")
        assert_minari_equals_npz(f"test/hopper/{name}-v0", str(tiny_suite.out / f"hopper-{name}-v0.npz"), algorithm)
    assert load(tiny_suite, "pendulum", "medium-replay")["timeouts"][-1]  # the run stopped on a time limit (600)


def episode_returns_by_loop(data: dict) -> list:
    returns, total = [], 0.0
    for reward, terminal, timeout in zip(data["rewards"], data["terminals"], data["timeouts"]):
        total += float(reward)
        if terminal or timeout:
            returns.append(total)
            total = 0.0
    return returns


def test_reference_scores_normalize_as_d4rl(tiny_suite, monkeypatch):
    """Minari's get_normalized_score on our sets and the summary's figures are D4RL's formula with its v2 hopper
    references, 100 (R - R_random) / (R_expert - R_random), over the complete episodes; Pendulum has none."""
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_suite.env["MINARI_DATASETS_PATH"])
    summary = {(s["task"], s["set"]): s for s in json.load(open(tiny_suite.out / "summary.json"))["sets"]}
    assert len(summary) == 8
    for name in ("medium-replay", "medium", "expert", "medium-expert"):
        dataset = minari.load_dataset(f"test/hopper/{name}-v0")
        returns = np.array([3234.3, -20.272305, 1000.0])
        # as D4RL's, a fraction: 1 = the expert reference
        np.testing.assert_allclose(minari.get_normalized_score(dataset, returns), [1.0, 0.0, 1020.272305 / 3254.572305], atol=1e-9)
        by_loop = episode_returns_by_loop(load(tiny_suite, "hopper", name))
        stats = summary[("hopper", name)]
        assert stats["episodes"] == len(by_loop) and stats["transitions"] == len(load(tiny_suite, "hopper", name)["rewards"])
        assert stats["mean_return"] == pytest.approx(np.mean(by_loop), rel=1e-9)
        assert stats["mean_normalized"] == pytest.approx(100 * (np.mean(by_loop) + 20.272305) / 3254.572305, rel=1e-9)
        assert stats["worst_return"] == pytest.approx(min(by_loop)) and stats["best_return"] == pytest.approx(max(by_loop))
        assert summary[("pendulum", name)]["mean_normalized"] is None
        assert f"| hopper | {name} | {stats['transitions']} | {stats['episodes']} |" in tiny_suite.stdout


def test_both_offline_scripts_read_every_set_by_id_and_by_path(tiny_suite, monkeypatch):
    """decision_transformer.py and decision_diffuser.py load each Hopper set by Minari id and by .npz path into the
    same arrays, and train on one of each through their command lines."""
    import decision_diffuser as dd
    import decision_transformer as dt

    monkeypatch.setenv("MINARI_DATASETS_PATH", tiny_suite.env["MINARI_DATASETS_PATH"])
    for name in ("medium-replay", "medium", "expert", "medium-expert"):
        path, dataset_id = str(tiny_suite.out / f"hopper-{name}-v0.npz"), f"test/hopper/{name}-v0"
        for by_path, by_id in [(dt.load_dataset(path), dt.load_dataset(dataset_id)),
                               (dd.load_dataset(path, False), dd.load_dataset(dataset_id, False))]:
            for key in ("observations", "actions", "rewards", "terminals"):
                np.testing.assert_array_equal(by_path[key], by_id[key], err_msg=f"{name} {key}")
            assert by_path["ref_scores"][:2] == by_id["ref_scores"][:2] == (-20.272305, 3234.3)
    common = ["--total-steps", "4", "--eval-every", "1000", "--eval-episodes", "1", "--no-cuda", "--batch-size", "8"]
    result = run_script("decision_transformer.py", "--dataset", "test/hopper/medium-expert-v0", *common,
                        "--context-len", "5", "--embed-dim", "16", "--n-layers", "1", "--warmup-steps", "2",
                        "--target-returns", "100", cwd=str(tiny_suite.folder), env=tiny_suite.env)
    assert "final evaluation (target 100): " in result.stdout and "Minari metadata" in result.stdout
    result = run_script("decision_diffuser.py", "--dataset", str(tiny_suite.out / "hopper-medium-replay-v0.npz"),
                        *common, "--horizon", "8", "--dim", "8", "--dim-mults", "1", "2", "--n-diffusion-steps", "4",
                        "--sampler", "ddim", "--sampling-steps", "2", "--inv-hidden-dim", "16", "--cdf-knots", "11",
                        cwd=str(tiny_suite.folder), env=tiny_suite.env)
    assert "final evaluation" in result.stdout, result.stdout


def test_a_rerun_skips_what_is_done_and_redoes_a_changed_file_to_the_same_bytes(tiny_suite):
    """The command again: every set 'already there', the same summary, and a deleted Minari dataset written again; a
    set whose file changed is made again, to the same bytes (seeded, same CPU), and so is one whose inputs changed."""
    summary = open(tiny_suite.out / "summary.md").read()
    minari_folder = os.path.join(tiny_suite.env["MINARI_DATASETS_PATH"], "test", "pendulum", "expert-v0")
    shutil.rmtree(minari_folder)
    result = run_tool(SUITE, *tiny_suite.command, cwd=str(tiny_suite.folder), env=tiny_suite.env)
    assert result.stdout.count("already there") == 8 and open(tiny_suite.out / "summary.md").read() == summary
    assert os.path.isdir(minari_folder)  # the missing Minari dataset is written again from its .npz
    path = tiny_suite.out / "hopper-medium-v0.npz"
    data = load(tiny_suite, "hopper", "medium")
    np.savez(path, **dict(data, rewards=data["rewards"] + 1))
    result = run_tool(SUITE, *tiny_suite.command, "--tasks", "hopper", "--sets", "medium", cwd=str(tiny_suite.folder),
                      env=tiny_suite.env)
    assert "hopper/medium: " in result.stdout and "already there" not in result.stdout.split("hopper/medium: ")[1]
    np.testing.assert_array_equal(load(tiny_suite, "hopper", "medium")["rewards"], data["rewards"])
    for steps in (STEPS - 100, STEPS):  # another --steps is another input: the set is made again, each time
        command = [*tiny_suite.command, "--tasks", "hopper", "--sets", "medium", "--steps", str(steps)]
        result = run_tool(SUITE, *command, cwd=str(tiny_suite.folder), env=tiny_suite.env)
        assert "already there" not in result.stdout.split("hopper/medium: ")[1]
        assert len(load(tiny_suite, "hopper", "medium")["rewards"]) == steps


@pytest.mark.parametrize("script", ["sac_continuous", "td3_continuous"])
def test_a_released_agent_evaluates_like_the_checkpoint_it_was_cut_from(tiny_suite, script):
    """The policy-only file loads in the script's evaluation-only mode and gives the full checkpoint's returns; it
    holds the actor alone (no critics, optimisers, buffer list or random state) and names the env and its bounds."""
    task = "hopper"
    checkpoint = glob.glob(str(tiny_suite.folder / f"{task}-{script[:3]}" / "runs" / "*" / f"{script}.pt"))[0]
    agent_path = str(tiny_suite.folder / "agents" / f"{task}-{ {'sac_continuous': 'sac-medium'}.get(script, 'td3-1m')}.pt")
    outputs = [run_script(f"{script}.py", "--eval-checkpoint", path, "--eval-episodes", "3",
                          cwd=str(tiny_suite.folder)).stdout.splitlines()[-1].split(": ", 1)[1]
               for path in (checkpoint, agent_path)]
    assert outputs[0] == outputs[1], outputs
    agent = torch.load(agent_path, weights_only=True)
    assert set(agent) == {"script", "version", "args", "global_step", "run_name", "actor", "agent"}
    assert agent["agent"]["env_id"] == "Hopper-v5" and agent["agent"]["action_low"] == [-1.0] * 3


def test_wrong_or_corrupt_agent_files_are_one_line_errors(tiny_suite, tmp_path):
    folder = tiny_suite.folder
    sac_agent, td3_agent = str(folder / "agents" / "hopper-sac-medium.pt"), str(folder / "agents" / "hopper-td3-1m.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(open(sac_agent, "rb").read()[:500])
    one_line_error(run_script("sac_continuous.py", "--eval-checkpoint", str(corrupt), cwd=str(tmp_path), check=False),
                   "corrupt")
    one_line_error(run_script("sac_continuous.py", "--eval-checkpoint", td3_agent, cwd=str(tmp_path), check=False),
                   "load it with td3_continuous.py")
    for script, agent in [("sac_continuous.py", sac_agent), ("td3_continuous.py", td3_agent)]:
        one_line_error(run_script(script, "--resume", agent, "--total-timesteps", "5000", cwd=str(tmp_path),
                                  check=False), "holds a policy only (a released agent)")
    agents = tmp_path / "agents"
    os.makedirs(agents)
    for name in ("hopper-td3-1m", "walker2d-td3-1m", "walker2d-sac-medium"):
        os.link(td3_agent, agents / f"{name}.pt")
    os.link(corrupt, agents / "hopper-sac-medium.pt")
    suite = ["--output-dir", str(tmp_path / "out"), "--agents", str(agents), "--no-minari"]
    one_line_error(run_tool(SUITE, *suite, "--tasks", "hopper", cwd=str(tmp_path), check=False), "corrupt")
    one_line_error(run_tool(SUITE, *suite, "--tasks", "walker2d", cwd=str(tmp_path), check=False),
                   "is an agent for Hopper-v5, not Walker2d-v5")
    one_line_error(run_tool(SUITE, *suite, "--tasks", "halfcheetah", cwd=str(tmp_path), check=False),
                   "agents.py release")
    one_line_error(run_tool(AGENTS, "release", str(corrupt), "--name", "x", "--commit", "c", "--command", "c",
                            "--folder", str(tmp_path), cwd=str(tmp_path), check=False), "cannot read checkpoint")


def test_the_model_card_samples_the_first_episodes_of_the_data(tiny_suite, tmp_path):
    """agents.py card: the deterministic evaluation is the script's own, and the sampled episodes are the first
    complete episodes of the suite's medium (SAC) and expert (TD3) sets: the same policy, seed and env."""
    folder = tmp_path / "agents"
    os.makedirs(folder)
    for name in ("hopper-sac-medium", "hopper-td3-1m"):
        os.link(tiny_suite.folder / "agents" / f"{name}.pt", folder / f"{name}.pt")
    run_tool(AGENTS, "card", "--folder", str(folder), "--episodes", "3", cwd=str(tmp_path))
    cards = {c["name"]: c for c in json.load(open(folder / "cards.json"))}
    for name, data_set in [("hopper-sac-medium", "medium"), ("hopper-td3-1m", "expert")]:
        first = episode_returns_by_loop(load(tiny_suite, "hopper", data_set))[:3]
        assert cards[name]["sampled_mean"] == pytest.approx(np.mean(first), rel=1e-6)
        script = cards[name]["script"]
        line = run_script(script, "--eval-checkpoint", str(folder / f"{name}.pt"), "--eval-episodes", "3",
                          cwd=str(tmp_path)).stdout.splitlines()[-1]
        assert line.split(": ", 1)[1].startswith(f"{cards[name]['deterministic_mean']:.1f} +- ")
    assert "| `hopper-td3-1m` | td3_continuous.py | Hopper-v5 | 500 (1) |" in open(folder / "README.md").read()
