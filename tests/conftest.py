import concurrent.futures
import glob
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts are single files at the top level: import them as modules

# The suite runs in two lanes: the tests in order, and beside them the long jobs of `background` (learning runs, the
# tiny offline suite). One torch thread per process, here and in every script a test starts, so that the two lanes
# share a 2-core machine without the many-fold slow-down of two multi-threaded torch processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
BACKGROUND = concurrent.futures.ThreadPoolExecutor(max_workers=1)
STARTED: dict = {}  # job -> (its folder, its future)


def start(job):
    """Start `job(folder)` in the background lane (once per session, in a fresh folder of its own) if not started."""
    if job not in STARTED:
        folder = tempfile.mkdtemp(prefix=f"pytest-{job.__name__}-")
        STARTED[job] = folder, BACKGROUND.submit(job, folder)
    return STARTED[job][1]


def background(job):
    """What `job(folder)` returned. A long job, marked `pytest.mark.background(job=job)` on every test that needs it,
    starts as soon as collection ends and runs on the other core while the tests before it run. It works in a folder
    of its own with absolute paths only (tests in the first lane change directory) and runs scripts as subprocesses,
    passing what they need in their `env` (tests in the first lane set environment variables). Its exceptions (a
    failed command, a skip) are the test's."""
    return start(job).result()


def pytest_collection_finish(session):
    option = session.config.option
    if not option.collectonly and not (session.testsfailed and not option.continue_on_collection_errors):
        for item in session.items:  # (nothing runs after --collect-only or a collection error)
            for marker in item.iter_markers("background"):
                start(marker.kwargs["job"])


def pytest_sessionfinish(session):
    BACKGROUND.shutdown(cancel_futures=True)  # a run stopped early (-x, Ctrl-C) waits for the job under way
    for folder, _ in STARTED.values():
        shutil.rmtree(folder, ignore_errors=True)


def run_script(script: str, *cli_args: str, cwd: str, check: bool = True, env: dict | None = None):
    """Run one of our scripts through its real command line, in `cwd` (with extra environment variables `env`)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *cli_args], cwd=cwd,
                            capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(cli_args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """All TensorBoard scalars of one run directory: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def only_run_dir(cwd: str) -> str:
    runs = glob.glob(os.path.join(cwd, "runs", "*"))
    assert len(runs) == 1, runs
    return runs[0]


def evaluation_returns(stdout: str) -> list[float]:
    """Mean returns of the evaluations a training script printed ("eval at step N: MEAN +- STD ..."), in order."""
    return [float(line.split(": ")[1].split(" +-")[0]) for line in stdout.splitlines()
            if line.startswith("eval at step")]


def all_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


def record_buffer_adds(monkeypatch, buffer_class) -> list:
    """Record every transition a training loop stores through `buffer_class.add` (a script's ReplayBuffer), as
    (obs, action, reward, terminated, next_obs), while still storing it."""
    import numpy as np

    records, original_add = [], buffer_class.add

    def add(self, obs, action, reward, terminated, next_obs):
        records.append((np.array(obs), np.array(action), reward, terminated, np.array(next_obs)))
        original_add(self, obs, action, reward, terminated, next_obs)

    monkeypatch.setattr(buffer_class, "add", add)
    return records


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh directory (scripts write runs/ and videos/ relative to the working directory)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def wandb_offline_tags(cwd: str) -> set[str]:
    """The metric keys that a `WANDB_MODE=offline` run in `cwd` recorded, read from wandb's own offline run file.

    wandb 0.31 ships no Python reader for it, so this walks the file's record log (a 7-byte header, then 32 KiB
    blocks of records, each with a 7-byte header: checksum, length, kind 1 = whole, 2/3/4 = first/middle/last part)
    and parses each record with wandb's own protobuf definitions."""
    from wandb.proto import wandb_internal_pb2

    paths = glob.glob(os.path.join(cwd, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(paths) == 1, f"expected one offline wandb run in {cwd}, found {paths}"
    raw = open(paths[0], "rb").read()
    assert raw[:4] == b":W&B", "not a wandb run file"
    block, position, pending, tags = 32768, 7, b"", set()
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                tags.update(item.key or "/".join(item.nested_key) for item in record.history.item)
            pending = b""
    return tags


@pytest.fixture(scope="session")
def sac_minari_export(tmp_path_factory):
    """One short Hopper-v5 run of sac_continuous.py through its real command line that exports its training
    transitions both as an .npz and as a Minari dataset (ids local/hopper-test-replay-v0 and, for the final policy's
    rollouts, local/hopper-test-rollouts-v0). Returns (folder, minari root): replay.npz and rollouts.npz lie in the
    folder, the datasets under the root (pass it as MINARI_DATASETS_PATH)."""
    pytest.importorskip("minari")
    folder = tmp_path_factory.mktemp("sac_export")
    root = str(folder / "minari")
    run_script("sac_continuous.py", "--env-id", "Hopper-v5", "--total-timesteps", "500", "--learning-starts", "200",
               "--batch-size", "32", "--hidden-dim", "32", "--eval-every", "1000", "--eval-episodes", "1",
               "--export-replay", "replay.npz", "--export-minari", "local/hopper-test-replay-v0",
               "--export-rollouts", "rollouts.npz", "--export-rollouts-minari", "local/hopper-test-rollouts-v0",
               "--export-rollout-steps", "300", cwd=str(folder), env={"MINARI_DATASETS_PATH": root})
    return folder, root


def assert_minari_equals_npz(dataset_id: str, npz_path: str, algorithm: str):
    """Load `dataset_id` with Minari's own API and check it holds exactly the transitions of the .npz export of the
    same run (docs/datasets.md): episodes of N + 1 observations, one end flag per episode at its last step,
    terminations and truncations apart, an unfinished last episode stored as truncated; and the metadata: env and
    evaluation env, references, algorithm, this checkout's commit. Returns the npz arrays."""
    import minari
    import numpy as np

    data, dataset = dict(np.load(npz_path)), minari.load_dataset(dataset_id)
    episodes = list(dataset.iterate_episodes())
    assert dataset.total_steps == len(data["rewards"]) and dataset.total_episodes == len(episodes)
    for episode in episodes:
        ends = episode.terminations | episode.truncations
        assert len(episode.observations) == len(episode.rewards) + 1 and ends[-1] and not ends[:-1].any()
    joined = {"observations": [e.observations[:-1] for e in episodes], "actions": [e.actions for e in episodes],
              "rewards": [e.rewards for e in episodes], "next_observations": [e.observations[1:] for e in episodes],
              "terminals": [e.terminations for e in episodes], "timeouts": [e.truncations for e in episodes]}
    expected = dict(data, timeouts=data["timeouts"].copy())
    expected["timeouts"][-1] |= not data["terminals"][-1]  # an unfinished last episode ends as a truncation
    for key, parts in joined.items():
        np.testing.assert_array_equal(np.concatenate(parts), expected[key], err_msg=key)
    metadata = dataset.storage.metadata
    assert dataset.spec.env_spec.id == str(data["env_id"]) == dataset.recover_environment(eval_env=True).spec.id
    assert (metadata["ref_min_score"], metadata["ref_max_score"]) == (float(data["ref_min_score"]),
                                                                      float(data["ref_max_score"]))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert algorithm in metadata["algorithm_name"] and commit in metadata["code_permalink"], metadata
    assert not [name for name in os.listdir(os.environ["MINARI_DATASETS_PATH"]) if name.startswith(".staging")]
    return data


@pytest.fixture(scope="session")
def inverted_pendulum_random_npz(tmp_path_factory) -> str:
    """300 steps of uniformly random actions on InvertedPendulum-v5 in the docs/datasets.md layout. A policy trained
    on it for a few steps drops the pole within a few dozen steps, so recorded evaluation videos stay short."""
    import gymnasium as gym
    import numpy as np

    env, rows = gym.make("InvertedPendulum-v5"), {key: [] for key in ("observations", "actions", "rewards",
                                                                      "next_observations", "terminals", "timeouts")}
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    for _ in range(300):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(rows, (obs, action, reward, next_obs, terminated, truncated and not terminated)):
            rows[key].append(value)
        obs = env.reset()[0] if terminated or truncated else next_obs
    path = str(tmp_path_factory.mktemp("inverted_pendulum") / "random.npz")
    np.savez(path, **{key: np.array(value, bool if key in ("terminals", "timeouts") else np.float32)
                      for key, value in rows.items()}, env_id=np.array("InvertedPendulum-v5"))
    return path


def run_killed_after_checkpoint(script: str, *cli_args: str, cwd: str, checkpoint_name: str) -> str:
    """Start a training run through the real command line, wait until it has written a checkpoint
    (runs/*/CHECKPOINT_NAME) and then TensorBoard events past it (as a run killed in real life has), and kill it with
    SIGKILL at whatever moment it is in. Returns the checkpoint's path."""
    import signal
    import time

    def state():  # (the checkpoint's time stamp, the size of the run's TensorBoard events)
        checkpoints = glob.glob(os.path.join(cwd, "runs", "*", checkpoint_name))
        events = glob.glob(os.path.join(cwd, "runs", "*", "events.out.tfevents.*"))
        return (os.stat(checkpoints[0]).st_mtime_ns if checkpoints else None), sum(map(os.path.getsize, events))

    process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *cli_args], cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + 600, (None, 0)
    while True:
        assert process.poll() is None, f"{script} ended before it could be killed: give it more steps"
        assert time.time() < deadline, f"{script} wrote no checkpoint and events after it in 600 s"
        now = state()
        if now[0] is not None and now[0] == seen[0] and now[1] > seen[1]:
            break  # events written after the latest checkpoint
        seen = now if now[0] != seen[0] else seen
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return glob.glob(os.path.join(cwd, "runs", "*", checkpoint_name))[0]


def evaluations_by_step(stdout: str) -> dict[int, str]:
    """{step: the evaluation line's text} of the evaluations a training script printed ("eval at step N: ...")."""
    return {int(line.split()[3].rstrip(":")): line.split(": ", 1)[1] for line in stdout.splitlines()
            if line.startswith("eval at step")}


def assert_same_tensors(got, want, where=""):
    """Recursive exact comparison of (nested dicts/lists of) tensors and numbers."""
    import torch

    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_same_tensors(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_tensors(a, b, f"{where}/{i}")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got.cpu(), want.cpu()), where
    else:
        assert got == want, where


def assert_resume_is_exact(script: str, cli_args: list, tmp_path, state_keys: list):
    """SAC/TD3: run `cli_args` (with --save-model) whole in one folder; in another, kill it with SIGKILL after a
    checkpoint and resume it with `--resume CHECKPOINT` alone. Both must print the same evaluations after the resume
    point, log the same TensorBoard scalars (charts/SPS, the wall-clock speed, excepted) and end with the same
    `state_keys`, random generators, logging state and replay buffer chunks, bit for bit."""
    import torch

    whole, broken, name = tmp_path / "whole", tmp_path / "broken", script.replace(".py", ".pt")
    whole.mkdir(), broken.mkdir()
    expected = run_script(script, *cli_args, cwd=str(whole))
    checkpoint = run_killed_after_checkpoint(script, *cli_args, cwd=str(broken), checkpoint_name=name)
    start = torch.load(checkpoint, weights_only=True)["global_step"]
    resumed = run_script(script, "--resume", checkpoint, cwd=str(broken))
    assert f"resumed at step {start}" in resumed.stdout
    want = evaluations_by_step(expected.stdout)
    assert evaluations_by_step(resumed.stdout) == {step: text for step, text in want.items() if step > start}
    got_scalars, want_scalars = read_scalars(only_run_dir(str(broken))), read_scalars(only_run_dir(str(whole)))
    del got_scalars["charts/SPS"], want_scalars["charts/SPS"]
    assert got_scalars == want_scalars
    got, want = (torch.load(glob.glob(f"{folder}/runs/*/{name}")[0], weights_only=True) for folder in (broken, whole))
    for key in [*state_keys, "replay", "random", "recent_returns", "metrics", "global_step"]:
        assert_same_tensors(got[key], want[key], key)
    for chunk in want["replay"]:
        assert_same_tensors(*(torch.load(glob.glob(f"{folder}/runs/*/replay/{chunk}")[0], weights_only=True)
                              for folder in (broken, whole)), chunk)
