"""Tests of decision_transformer.py: returns-to-go, causality and padding, the three dataset readers, batch sampling,
evaluation bookkeeping, the real CLI, learning on a Pendulum dataset, checkpoints, determinism and bad input."""

import glob
import os
import random
import shutil
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import gymnasium as gym
import numpy as np
import pytest
import torch

import decision_transformer as dt
from conftest import (all_finite, assert_same_tensors, background, only_run_dir, read_scalars,
                      run_killed_after_checkpoint, run_script, wandb_offline_tags)

SCRIPT = "decision_transformer.py"
TINY = ["--no-cuda", "--context-len", "5", "--embed-dim", "32", "--n-layers", "1", "--batch-size", "16",
        "--warmup-steps", "10", "--eval-episodes", "2", "--log-every", "20"]


def pendulum_controller(obs: np.ndarray) -> float:
    """A decent hand-written swing-up controller (mean return about -145): pump energy, then PD near upright."""
    cos, sin, velocity = obs
    if cos > 0.85:
        return float(np.clip(-(10.0 * np.arctan2(sin, cos) + 2.0 * velocity), -2.0, 2.0))
    energy = velocity**2 / 6 + 5 * cos  # kinetic (I = 1/3) plus potential energy; 5 is upright at rest
    return float(np.clip(velocity * (5.0 - energy), -2.0, 2.0))


def inverted_pendulum_controller(obs: np.ndarray) -> float:
    """A linear state-feedback controller that balances InvertedPendulum-v5 for all 1000 steps without noise."""
    return float(np.array([0.5, 5.0, 0.5, 0.5]) @ obs)


def write_dataset(path, env_id: str, controller, noise_levels, episodes: int, seed: int = 0) -> dict:
    """Episodes of `controller` plus Gaussian action noise whose scale cycles through `noise_levels` (so the data
    mixes good and bad episodes), in the docs/datasets.md layout. Returns the arrays and the episode returns.
    `controller` may be a list: episode i then uses controller[i % len(controller)]."""
    env = gym.make(env_id)
    low, high = env.action_space.low[0], env.action_space.high[0]
    rng = np.random.default_rng(seed)
    rows = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    episode_returns = []
    for episode in range(episodes):
        noise = noise_levels[episode % len(noise_levels)]
        act = controller[episode % len(controller)] if isinstance(controller, list) else controller
        obs, _ = env.reset(seed=seed * 1000 + episode)
        done, total = False, 0.0
        while not done:
            action = float(np.clip(act(obs) + noise * rng.normal(), low, high))
            next_obs, reward, terminated, truncated, _ = env.step(np.array([action], np.float32))
            for key, value in zip(rows, (obs, [action], reward, next_obs, terminated, truncated and not terminated)):
                rows[key].append(value)
            total += reward
            obs, done = next_obs, terminated or truncated
        episode_returns.append(total)
    data = {key: np.asarray(value, np.float32 if key not in ("terminals", "timeouts") else bool)
            for key, value in rows.items()}
    np.savez(path, **data, env_id=np.array(env_id), source=np.array(f"tests: controller + noise {noise_levels}"))
    return {**data, "episode_returns": np.array(episode_returns), "env_id": env_id}


def write_pendulum_dataset(path, episodes: int = 30, seed: int = 0) -> dict:
    return write_dataset(path, "Pendulum-v1", pendulum_controller, [0.0, 0.5, 1.0, 2.0], episodes, seed)


@pytest.fixture(scope="module")
def pendulum_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pendulum.npz"
    return str(path), write_pendulum_dataset(path)


def write_minari_dataset(dataset_id: str, data: dict, eval_env=None):
    """The episodes of `data` as a local Minari dataset (under $MINARI_DATASETS_PATH), via Minari's own writer."""
    minari = pytest.importorskip("minari")
    starts, ends = dt.episode_bounds(data)
    buffers = [minari.data_collector.EpisodeBuffer(
        id=i, observations=np.concatenate([data["observations"][s:e], data["next_observations"][e - 1:e]]),
        actions=data["actions"][s:e], rewards=data["rewards"][s:e], terminations=data["terminals"][s:e],
        truncations=data["timeouts"][s:e], infos={}) for i, (s, e) in enumerate(zip(starts, ends))]
    minari.create_dataset_from_buffers(dataset_id, buffers, env=gym.make(data["env_id"]), eval_env=eval_env,
                                       algorithm_name="controller", author="tests", author_email="t@example.org",
                                       code_permalink="https://example.org", description="test data")


def tiny_model(obs_dim=3, act_dim=2, dropout=0.0, low=-1.0, high=1.0):
    torch.manual_seed(0)
    model = dt.DecisionTransformer(obs_dim, act_dim, np.full(act_dim, low, np.float32),
                                   np.full(act_dim, high, np.float32), 32, 2, 2, dropout, 100)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Returns-to-go and batch sampling
# ----------------------------------------------------------------------------------------------------------------------
def test_returns_to_go_are_undiscounted_suffix_sums_reset_at_episode_ends():
    rewards = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 5.0], np.float32)
    data = {"terminals": np.array([0, 0, 1, 0, 0, 0], bool), "timeouts": np.array([0, 0, 0, 0, 1, 0], bool)}
    data["timeouts"][-1] = True  # what load_dataset does to an unfinished last episode
    starts, ends = dt.episode_bounds(data)
    assert starts.tolist() == [0, 3, 5] and ends.tolist() == [3, 5, 6]
    assert dt.returns_to_go(rewards, starts, ends).tolist() == [6.0, 5.0, 3.0, 30.0, 20.0, 5.0]


def test_sequence_buffer_windows_stay_in_their_episode_and_scale_returns_to_go():
    rng = np.random.default_rng(0)
    lengths = [7, 3, 12]
    n = sum(lengths)
    ends = np.cumsum(lengths)
    data = {"observations": rng.normal(size=(n, 3)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "terminals": np.isin(np.arange(n), ends[:1] - 1), "timeouts": np.isin(np.arange(n), ends[1:] - 1)}
    mean, std = data["observations"].mean(0), data["observations"].std(0) + 1e-6
    buffer = dt.SequenceBuffer(data, mean, std, 10.0, 100, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    states, actions, rtg, timesteps, mask = buffer.sample(4000, 5, generator)
    expected_rtg = dt.returns_to_go(data["rewards"], *dt.episode_bounds(data)) / 10.0
    starts = np.concatenate([[0], ends[:-1]])
    first_rows = []
    for b in range(0, 4000, 97):
        # Identify the window's first row by its (normalised) state, then check every step of the window.
        first = int(np.argmin(np.abs((data["observations"] - mean) / std - states[b, 0].numpy()).sum(1)))
        first_rows.append(first)
        episode = np.searchsorted(ends, first, side="right")
        real = min(5, ends[episode] - first)
        assert mask[b].tolist() == [True] * real + [False] * (5 - real)
        for k in range(real):
            np.testing.assert_allclose(actions[b, k].numpy(), data["actions"][first + k], rtol=1e-6)
            np.testing.assert_allclose(rtg[b, k, 0].item(), expected_rtg[first + k], rtol=1e-5)
            assert timesteps[b, k].item() == first + k - starts[episode]
    # Starts are uniform over rows (= episodes in proportion to their length, then a uniform start).
    counts = np.bincount(first_rows, minlength=n)
    assert (counts > 0).sum() > n // 2


def test_sampled_window_starts_are_uniform_over_rows():
    n = 50
    data = {"observations": np.arange(n, dtype=np.float32)[:, None], "actions": np.zeros((n, 1), np.float32),
            "rewards": np.zeros(n, np.float32), "terminals": np.zeros(n, bool),
            "timeouts": np.isin(np.arange(n), [9, 49])}  # episodes of 10 and 40 steps
    buffer = dt.SequenceBuffer(data, np.zeros(1, np.float32), np.ones(1, np.float32), 1.0, 100, torch.device("cpu"))
    states = buffer.sample(50_000, 3, torch.Generator().manual_seed(1))[0]
    first = states[:, 0, 0].long().numpy()
    frequencies = np.bincount(first, minlength=n) / len(first)
    np.testing.assert_allclose(frequencies, 1 / n, atol=0.006)  # the 40-step episode gets 4x the 10-step one's share


# ----------------------------------------------------------------------------------------------------------------------
# Causality and padding
# ----------------------------------------------------------------------------------------------------------------------
def random_sequence(batch=2, length=6, obs_dim=3, act_dim=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, obs_dim, generator=generator),
            torch.rand(batch, length, act_dim, generator=generator) * 2 - 1,
            torch.randn(batch, length, 1, generator=generator),
            torch.randint(0, 90, (batch, length), generator=generator))


@pytest.mark.parametrize("t", [0, 2, 5])
def test_action_at_t_ignores_everything_after_the_state_token_of_t(t):
    model = tiny_model()
    states, actions, rtg, timesteps = random_sequence()
    with torch.no_grad():
        reference = model(states, actions, rtg, timesteps)[:, t]
        changed_actions = actions.clone()
        changed_actions[:, t:] = torch.rand_like(changed_actions[:, t:])  # a_t itself comes after s_t
        changed_states, changed_rtg, changed_timesteps = states.clone(), rtg.clone(), timesteps.clone()
        changed_states[:, t + 1:] += 5.0
        changed_rtg[:, t + 1:] -= 3.0
        changed_timesteps[:, t + 1:] = 0
        after = model(changed_states, changed_actions, changed_rtg, changed_timesteps)[:, t]
    torch.testing.assert_close(after, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change", ["R_t", "s_t", "earlier state", "earlier action", "earlier return", "timestep"])
def test_action_at_t_depends_on_earlier_tokens(change):
    model = tiny_model()
    states, actions, rtg, timesteps = random_sequence()
    t = 3
    changed = {"states": states.clone(), "actions": actions.clone(), "rtg": rtg.clone(), "timesteps": timesteps.clone()}
    if change == "R_t":
        changed["rtg"][:, t] += 1.0
    elif change == "s_t":
        changed["states"][:, t] += 1.0
    elif change == "earlier state":
        changed["states"][:, 0] += 1.0
    elif change == "earlier action":
        changed["actions"][:, t - 1] = -changed["actions"][:, t - 1]
    elif change == "earlier return":
        changed["rtg"][:, 1] += 1.0
    else:
        changed["timesteps"][:, 0] += 1
    with torch.no_grad():
        reference = model(states, actions, rtg, timesteps)[:, t]
        after = model(changed["states"], changed["actions"], changed["rtg"], changed["timesteps"])[:, t]
    assert (after - reference).abs().max() > 1e-4


def test_right_padding_does_not_change_real_predictions_and_matches_the_unpadded_sequence():
    model = tiny_model()
    states, actions, rtg, timesteps = random_sequence(length=8)
    real = 5
    with torch.no_grad():
        unpadded = model(states[:, :real], actions[:, :real], rtg[:, :real], timesteps[:, :real])
        for pad_value in (0.0, -10.0, 7.0):  # whatever the pads hold, the real steps' predictions stay the same
            padded = [x.clone() for x in (states, actions, rtg)]
            for x in padded:
                x[:, real:] = pad_value
            predicted = model(*padded, timesteps)[:, :real]
            torch.testing.assert_close(predicted, unpadded, rtol=0, atol=1e-6)


def test_loss_ignores_padded_steps():
    model = tiny_model()
    states, actions, rtg, timesteps = random_sequence(length=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = dt.action_loss(model, states, actions, rtg, timesteps, mask)
    actions_with_other_pads = actions.clone()
    actions_with_other_pads[0, 4:] = 0.9
    assert dt.action_loss(model, states, actions_with_other_pads, rtg, timesteps, mask).item() == pytest.approx(
        loss.item(), abs=1e-7)
    with torch.no_grad():
        predicted = model(states, actions, rtg, timesteps)
    expected = ((predicted - actions) ** 2).mean(-1)[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_action_head_is_scaled_to_each_dimensions_bounds():
    torch.manual_seed(0)
    low, high = np.array([-2.0, 0.0], np.float32), np.array([2.0, 10.0], np.float32)
    model = dt.DecisionTransformer(3, 2, low, high, 32, 1, 1, 0.0, 100).eval()
    with torch.no_grad():
        model.predict_action.weight.mul_(1000)  # saturate tanh to reach the bounds
        predicted = model(*random_sequence(batch=64, length=4))
    assert (predicted[..., 0] >= -2).all() and (predicted[..., 0] <= 2).all()
    assert (predicted[..., 1] >= 0).all() and (predicted[..., 1] <= 10).all()
    assert predicted[..., 1].max() > 9.9 and predicted[..., 1].min() < 0.1 and predicted[..., 0].min() < -1.9


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation bookkeeping
# ----------------------------------------------------------------------------------------------------------------------
class RecordingModel(torch.nn.Module):
    """Stands in for the transformer: records what evaluation feeds it and answers a fixed action."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, states, actions, rtg, timesteps):
        self.calls.append((states.clone(), actions.clone(), rtg.clone(), timesteps.clone()))
        return torch.full(states.shape[:2] + (1,), 0.5)


def test_evaluation_feeds_return_to_go_minus_rewards_so_far_and_the_last_k_steps():
    model = RecordingModel()
    mean, std = np.array([0.1, 0.2, 0.3], np.float32), np.array([2.0, 2.0, 4.0], np.float32)
    returns = dt.evaluate(model, lambda: gym.make("Pendulum-v1"), [-100.0, -300.0], 2, 123, mean, std, 100.0, 4, 200,
                          torch.device("cpu"))
    # Replay episode 0 by hand with the same seed and the same constant action.
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=123)
    observations, rewards = [], []
    for _ in range(200):
        observations.append(obs)
        obs, reward, _, _, _ = env.step(np.array([0.5], np.float32))
        rewards.append(reward)
    assert returns.shape == (2, 2) and returns[0, 0] == pytest.approx(sum(rewards), rel=1e-5)
    assert returns[1, 0] == pytest.approx(sum(rewards), rel=1e-5)  # same seed for episode 0 of every target
    for t in (0, 1, 3, 4, 150):
        states, actions, rtg, timesteps = model.calls[t]
        assert states.shape[:2] == (4, min(t + 1, 4))  # the last min(t + 1, K) steps, no padding
        first = max(0, t + 1 - 4)
        assert timesteps[0].tolist() == list(range(first, t + 1))
        # R_t = (target - sum_{t' < t} r_t') / scale, for target 0 (row 0) and target 1 (row 2)
        for row, target in ((0, -100.0), (2, -300.0)):
            expected = [(target - sum(rewards[:k])) / 100.0 for k in range(first, t + 1)]
            np.testing.assert_allclose(rtg[row, :, 0].numpy(), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(states[0, -1].numpy(), (observations[t] - mean) / std, rtol=1e-5, atol=1e-6)
        assert (actions[0, :-1] == 0.5).all()  # earlier actions are the ones taken


class StatePolicy(torch.nn.Module):
    """Acts a = clip(3 * theta_dot_normalised) from the state token: a policy that lets the pole fall at different
    times in different episodes."""

    def forward(self, states, actions, rtg, timesteps):
        return (3.0 * states[..., 3:4]).clamp(-3.0, 3.0)


def test_evaluation_ignores_rewards_after_an_episode_ends():
    """Episodes that terminate early (InvertedPendulum-v5) score exactly what a single-env replay scores: the
    vector env's autoreset steps after the end are not counted."""
    returns = dt.evaluate(StatePolicy(), lambda: gym.make("InvertedPendulum-v5"), [1000.0], 4, 7,
                          np.zeros(4, np.float32), np.ones(4, np.float32), 1000.0, 5, 1000, torch.device("cpu"))[0]
    env = gym.make("InvertedPendulum-v5")
    replayed = []
    for i in range(4):
        obs, _ = env.reset(seed=7 + i)
        total, done = 0.0, False
        while not done:
            action = np.clip(3.0 * np.float32(obs[3]), -3.0, 3.0)
            obs, reward, terminated, truncated, _ = env.step(np.array([action], np.float32))
            total, done = total + reward, terminated or truncated
        replayed.append(total)
    assert len(set(replayed)) > 1 and max(replayed) < 1000  # the episodes really end early, at different times
    np.testing.assert_allclose(returns, replayed)


# ----------------------------------------------------------------------------------------------------------------------
# Dataset readers
# ----------------------------------------------------------------------------------------------------------------------
def test_npz_hdf5_and_minari_give_identical_arrays(tmp_path, monkeypatch, pendulum_data):
    npz_path, data = pendulum_data
    from_npz = dt.load_dataset(npz_path)
    h5py = pytest.importorskip("h5py")
    hdf5_path = str(tmp_path / "pendulum.hdf5")
    with h5py.File(hdf5_path, "w") as file:  # D4RL's layout: float64 arrays at the top level
        for key in ("observations", "actions", "rewards", "next_observations"):
            file.create_dataset(key, data=data[key].astype(np.float64))
        file.create_dataset("terminals", data=data["terminals"])
        file.create_dataset("timeouts", data=data["timeouts"])
        file.attrs["env_id"] = "Pendulum-v1"
    from_hdf5 = dt.load_dataset(hdf5_path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    write_minari_dataset("tests/pendulum/mixed-v0", data)
    from_minari = dt.load_dataset("tests/pendulum/mixed-v0")
    for loaded in (from_hdf5, from_minari):
        for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
            assert loaded[key].dtype == from_npz[key].dtype
            np.testing.assert_array_equal(loaded[key], from_npz[key])
        assert loaded["env_id"] == "Pendulum-v1"
    assert from_npz["timeouts"].sum() == 30 and not from_npz["terminals"].any()


def test_a_minari_dataset_exported_by_sac_reads_like_its_npz_and_trains(sac_minari_export, monkeypatch, tmp_path):
    """The Minari route of docs/datasets.md: sac_continuous.py --export-minari ID, then --dataset ID."""
    folder, root = sac_minari_export
    monkeypatch.setenv("MINARI_DATASETS_PATH", root)
    from_npz, from_minari = dt.load_dataset(str(folder / "replay.npz")), dt.load_dataset("local/hopper-test-replay-v0")
    for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
        assert from_minari[key].dtype == from_npz[key].dtype, key
        np.testing.assert_array_equal(from_minari[key], from_npz[key], err_msg=key)
    assert from_minari["env_id"] == "Hopper-v5" and from_minari["timeouts"][-1]  # the unfinished last episode
    assert from_minari["ref_scores"][:2] == from_npz["ref_scores"][:2] == (-20.272305, 3234.3)
    result = run_script(SCRIPT, "--dataset", "local/hopper-test-replay-v0", "--total-steps", "20", "--eval-every",
                        "1000", "--target-returns", "100", *TINY, cwd=str(tmp_path), env={"MINARI_DATASETS_PATH": root})
    assert "final evaluation (target 100): " in result.stdout and "Minari metadata" in result.stdout, result.stdout


def test_capture_video_records_one_episode_per_target_without_changing_returns(inverted_pendulum_random_npz, in_tmp):
    """--capture-video records the final evaluation, one video per target return; the evaluation-only mode of the
    run's checkpoint (no video) gives the very same returns, and records too when asked."""
    pytest.importorskip("moviepy")
    cli = ["--dataset", inverted_pendulum_random_npz, "--total-steps", "20", "--eval-every", "1000", "--target-returns",
           "100", "200", *TINY]
    recorded = run_script(SCRIPT, *cli, "--capture-video", "--save-model", cwd=in_tmp, check=False,
                          env={"MUJOCO_GL": "egl"})
    if recorded.returncode != 0 and "cannot render" in recorded.stderr:
        pytest.skip(f"no rendering backend here: {recorded.stderr.strip()}")
    assert recorded.returncode == 0, recorded.stderr
    run_dir = only_run_dir(in_tmp)
    videos = os.path.join("videos", os.path.basename(run_dir))
    assert sorted(os.listdir(videos)) == ["target-100-episode-0.mp4", "target-200-episode-0.mp4"]
    assert all(os.path.getsize(os.path.join(videos, name)) > 0 for name in os.listdir(videos))
    checkpoint = os.path.join(run_dir, "decision_transformer.pt")
    plain = run_script(SCRIPT, "--eval-checkpoint", checkpoint, "--eval-episodes", "2", cwd=in_tmp)
    again = run_script(SCRIPT, "--eval-checkpoint", checkpoint, "--eval-episodes", "2", "--capture-video",
                       "--exp-name", "again", cwd=in_tmp, env={"MUJOCO_GL": "egl"})

    def texts(result, start: str) -> list[str]:  # what follows ": " on the output lines that begin with `start`
        return [line.split(": ")[1] for line in result.stdout.splitlines() if line.startswith(start)]

    assert texts(plain, "evaluation of") == texts(again, "evaluation of") == texts(recorded, "final evaluation")
    assert len(glob.glob("videos/InvertedPendulum-v5__again__*/target-*-episode-0.mp4")) == 2


def test_capture_video_errors_are_one_line(in_tmp, pendulum_data, monkeypatch):
    """Without moviepy, or with a MUJOCO_GL backend that does not exist: a one-line error naming the fix."""
    path, _ = pendulum_data
    monkeypatch.setitem(sys.modules, "moviepy", None)  # as if moviepy were not installed
    with pytest.raises(SystemExit, match="--capture-video needs moviepy: pip install moviepy"):
        dt.main(dt.Args(dataset=path, capture_video=True))
    result = run_script(SCRIPT, "--dataset", path, "--env-id", "Hopper-v5", cwd=in_tmp, check=False,
                        env={"MUJOCO_GL": "no-such-backend"})
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "MUJOCO_GL" in result.stderr


def test_unfinished_last_episode_is_kept_as_truncated(tmp_path, pendulum_data):
    _, data = pendulum_data
    path = str(tmp_path / "cut.npz")
    arrays = {key: data[key][:250] for key in ("observations", "actions", "rewards", "terminals", "timeouts")}
    np.savez(path, **arrays, env_id=np.array("Pendulum-v1"))
    loaded = dt.load_dataset(path)
    starts, ends = dt.episode_bounds(loaded)
    assert ends.tolist() == [200, 250] and loaded["timeouts"][-1]


# ----------------------------------------------------------------------------------------------------------------------
# The real command line
# ----------------------------------------------------------------------------------------------------------------------
def test_cli_trains_evaluates_and_logs_finite_metrics(in_tmp, pendulum_data):
    path, _ = pendulum_data
    result = run_script(SCRIPT, "--dataset", path, "--total-steps", "60", "--eval-every", "30",
                        "--target-returns", "-150", "-400", *TINY, cwd=in_tmp)
    scalars = read_scalars(only_run_dir(in_tmp))
    for tag in ("losses/action_mse", "charts/grad_norm", "charts/learning_rate", "charts/SPS",
                "eval/return_target_-150", "eval/return_target_-400"):
        assert tag in scalars and all_finite(v for _, v in scalars[tag]), tag
    assert [s for s, _ in scalars["losses/action_mse"]] == [20, 40, 60]
    assert [s for s, _ in scalars["eval/return_target_-150"]] == [30, 60]
    lr = dict(scalars["charts/learning_rate"])
    assert lr[20] == pytest.approx(1e-4) and lr[60] == pytest.approx(1e-4)  # warm-up of 10 steps is over
    assert "final evaluation (target -150)" in result.stdout and "step 60/60" in result.stdout
    assert "normalized" not in result.stdout  # Pendulum has no reference scores


def test_normalized_score_uses_the_files_references(in_tmp, pendulum_data):
    """A file's own ref_min_score / ref_max_score give 100 (R - min) / (max - min), logged per target and printed."""
    _, data = pendulum_data
    arrays = {key: data[key] for key in ("observations", "actions", "rewards", "terminals", "timeouts")}
    np.savez("with_refs.npz", **arrays, env_id=np.array("Pendulum-v1"), ref_min_score=np.array(-1500.0),
             ref_max_score=np.array(0.0))
    result = run_script(SCRIPT, "--dataset", "with_refs.npz", "--total-steps", "10", "--eval-every", "1000",
                        "--target-returns", "-150", *TINY[:-2], "--log-every", "10", cwd=in_tmp)
    line = [line for line in result.stdout.splitlines() if line.startswith("final evaluation (target -150)")][0]
    mean = float(line.split(": ")[1].split(" +-")[0])
    assert "the dataset file's references" in line
    assert f"normalized score {100.0 * (mean + 1500.0) / 1500.0:.1f}" in line
    logged = dict(read_scalars(only_run_dir(in_tmp))["eval/normalized_score_target_-150"])[10]
    assert logged == pytest.approx(100.0 * (mean + 1500.0) / 1500.0, abs=0.06)


def test_learning_rate_warms_up_linearly(in_tmp, pendulum_data):
    path, _ = pendulum_data
    run_script(SCRIPT, "--dataset", path, "--total-steps", "40", "--eval-every", "1000", *TINY[:-2], "--log-every",
               "10", "--warmup-steps", "40", "--eval-episodes", "1", cwd=in_tmp)
    lr = dict(read_scalars(only_run_dir(in_tmp))["charts/learning_rate"])
    for step in (10, 20, 30):  # after `step` optimizer steps the rate is lr * (step + 1) / warmup
        assert lr[step] == pytest.approx(1e-4 * (step + 1) / 40, rel=1e-5)


def inverted_pendulum_learning_run(folder):
    data = write_dataset(os.path.join(folder, "inverted_pendulum.npz"), "InvertedPendulum-v5",
                         inverted_pendulum_controller, [0.1, 0.3, 0.5, 1.0], episodes=20)
    result = run_script(SCRIPT, "--dataset", "inverted_pendulum.npz", "--total-steps", "1000", "--eval-every",
                        "100000", "--context-len", "10", "--embed-dim", "64", "--n-layers", "2", "--batch-size", "64",
                        "--learning-rate", "1e-3", "--warmup-steps", "100", "--reward-scale", "100",
                        "--target-returns", "1000", "--eval-episodes", "10", "--log-every", "500", cwd=folder)
    return data, result


@pytest.mark.learning
@pytest.mark.background(job=inverted_pendulum_learning_run)
def test_learning_beats_the_dataset_mean():
    """A small model conditioned on a high return beats the dataset's mean episode return by a clear margin.

    InvertedPendulum-v5 rather than Pendulum-v1: its rewards are positive (+1 per step alive), as in the locomotion
    tasks. Pendulum's are negative, so a target above what a start state allows drives the return-to-go above zero,
    a value the data never shows. The controller's actions carry Gaussian noise (as a stochastic policy's do);
    without it the next action equals the previous one and a transformer learns to copy it instead of the state."""
    data, result = background(inverted_pendulum_learning_run)
    dataset_mean, dataset_best = data["episode_returns"].mean(), data["episode_returns"].max()
    assert 300 < dataset_mean < 600 and dataset_best == 1000  # good and bad episodes mixed
    final = float(result.stdout.split("final evaluation (target 1000): ")[1].split(" +-")[0])
    print(f"dataset mean {dataset_mean:.1f}, best {dataset_best:.1f}, DT {final:.1f}")
    assert final > dataset_mean + 0.5 * (dataset_best - dataset_mean)


def test_checkpoint_round_trip_and_determinism(in_tmp, pendulum_data):
    path, _ = pendulum_data
    cli = ["--dataset", path, "--total-steps", "40", "--eval-every", "1000", "--target-returns", "-200", *TINY]
    first = run_script(SCRIPT, *cli, "--save-model", cwd=in_tmp)
    checkpoint = os.path.join(only_run_dir(in_tmp), "decision_transformer.pt")
    final_line = [line for line in first.stdout.splitlines() if line.startswith("final evaluation")][0]
    evaluated = run_script(SCRIPT, "--eval-checkpoint", checkpoint, "--eval-episodes", "2", cwd=in_tmp)
    assert final_line.split(": ")[1] in evaluated.stdout  # same returns without the dataset
    second = run_script(SCRIPT, *cli, "--exp-name", "again", cwd=in_tmp)
    assert [line for line in second.stdout.splitlines() if line.startswith("final evaluation")][0] == final_line
    state = torch.load(checkpoint, weights_only=True)
    assert state["script"] == "decision_transformer" and state["global_step"] == 40
    assert state["task"]["state_mean"].shape == (3,) and state["task"]["target_returns"] == [-200.0]


def test_compile_trains_and_evaluates(in_tmp, pendulum_data):
    """--compile wraps the training loss in torch.compile; evaluation stays eager (its sequence length grows)."""
    path, _ = pendulum_data
    result = run_script(SCRIPT, "--dataset", path, "--total-steps", "10", "--eval-every", "1000", "--compile",
                        "--target-returns", "-200", *TINY[:-2], "--log-every", "10", "--eval-episodes", "1",
                        cwd=in_tmp)
    scalars = read_scalars(only_run_dir(in_tmp))
    assert all_finite(v for _, v in scalars["losses/action_mse"]) and "final evaluation" in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, no traceback
# ----------------------------------------------------------------------------------------------------------------------
def one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("decision_transformer.py: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_gives_one_line_errors(in_tmp, pendulum_data):
    path, data = pendulum_data
    with open("corrupt.npz", "wb") as file:
        file.write(b"not a zip file")
    np.savez("no_actions.npz", observations=data["observations"], rewards=data["rewards"])
    np.savez("no_env.npz", **{key: data[key] for key in ("observations", "actions", "rewards", "terminals", "timeouts")})
    with open("corrupt.pt", "wb") as file:
        file.write(b"garbage")
    torch.save({"script": "sac_continuous", "version": 1}, "sac.pt")
    cases = [((), ["--dataset"]),
             (("--dataset", "missing.npz"), ["not found", "--export-replay"]),
             (("--dataset", "corrupt.npz"), ["corrupt"]),
             (("--dataset", "no_actions.npz"), ["lacks the keys", "actions"]),
             (("--dataset", path, "--env-id", "Hopper-v5"), ["obs_dim 3", "--env-id"]),
             (("--dataset", "no_env.npz"), ["--env-id"]),
             (("--dataset", path, "--env-id", "NoSuchEnv-v0"), ["--env-id"]),
             (("--dataset", path, "--embed-dim", "30", "--n-heads", "4"), ["divisible"]),
             (("--dataset", path, "--total-steps", "0"), ["--total-steps"]),
             (("--dataset", path, "--max-ep-len", "100"), ["--max-ep-len"]),
             (("--dataset", "someone/unknown-dataset-v0"), ["--download-dataset"]),
             (("--eval-checkpoint", "missing.pt"), ["does not exist"]),
             (("--eval-checkpoint", "corrupt.pt"), ["corrupt"]),
             (("--eval-checkpoint", "sac.pt"), ["sac_continuous.py"])]
    with ThreadPoolExecutor(4) as pool:  # each case is a fresh process that mostly imports: run a few at once
        results = pool.map(lambda cli: run_script(SCRIPT, *cli, cwd=in_tmp, check=False), [cli for cli, _ in cases])
        for (cli, fragments), result in zip(cases, results):
            one_line_error(result, *fragments)


# ----------------------------------------------------------------------------------------------------------------------
# Correctness pass (issue 11)
# ----------------------------------------------------------------------------------------------------------------------
def test_track_sends_losses_and_evaluations_to_weights_and_biases(in_tmp, pendulum_data):
    """wandb's sync_tensorboard only sees SummaryWriters created after wandb.init: the offline run must hold them."""
    pytest.importorskip("wandb")
    path, _ = pendulum_data
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(in_tmp), "WANDB_SILENT": "true"}
    run_script(SCRIPT, "--dataset", path, "--total-steps", "20", "--eval-every", "1000", "--track",
               "--target-returns", "-200", *TINY[:-4], "--eval-episodes", "1", "--log-every", "10", cwd=in_tmp, env=env)
    tags = wandb_offline_tags(str(in_tmp))
    assert any(tag.startswith("losses/") for tag in tags) and "eval/return_target_-200" in tags, tags


def test_speed_is_measured_over_the_last_interval_without_evaluations(in_tmp, pendulum_data, monkeypatch):
    """A fake clock: every training step takes 10 ms and every evaluation 1000 s. The logged SPS must be 100 at every
    logging step (an average since the start would count the evaluation and fall to about 0.03)."""
    path, _ = pendulum_data
    clock = [0.0]
    real_train_step, real_evaluate = dt.train_step, dt.evaluate

    def train_step(*args, **kwargs):
        clock[0] += 0.01
        return real_train_step(*args, **kwargs)

    def evaluate(*args, **kwargs):
        clock[0] += 1000.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(dt, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], time=time.time))
    monkeypatch.setattr(dt, "train_step", train_step)
    monkeypatch.setattr(dt, "evaluate", evaluate)
    dt.main(dt.Args(dataset=path, total_steps=40, eval_every=20, log_every=10, target_returns=[-200.0], cuda=False,
                    context_len=5, embed_dim=32, n_layers=1, batch_size=16, warmup_steps=10, eval_episodes=1))
    sps = read_scalars(only_run_dir(in_tmp))["charts/SPS"]
    assert [step for step, _ in sps] == [10, 20, 30, 40]
    assert [value for _, value in sps] == pytest.approx([100.0] * 4)


def test_gpt2_initialisation_as_in_the_official_code():
    """kzl/decision-transformer's trajectory_gpt2.py initialises the transformer as HuggingFace GPT-2's _init_weights:
    every Linear weight N(0, 0.02) (no 1/sqrt(2L) scaling of the residual projections), biases 0, LayerNorm 1 and 0."""
    torch.manual_seed(0)
    model = dt.DecisionTransformer(11, 3, -np.ones(3), np.ones(3), 128, 3, 1, 0.1, 1000)
    for name, parameter in model.blocks.named_parameters():
        if name.endswith("weight") and parameter.dim() == 2:
            assert abs(parameter.std().item() - 0.02) < 0.001 and abs(parameter.mean().item()) < 0.001, name
        else:  # biases and LayerNorm weights
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.equal(parameter, torch.full_like(parameter, expected)), name


def test_checkpoint_evaluation_uses_the_runs_own_seed(in_tmp, pendulum_data):
    """Without --eval-seed, --eval-checkpoint evaluates on the run's own start states (seed 7 here, not the default
    1), so it reproduces the run's final evaluation; --eval-seed picks other start states."""
    path, _ = pendulum_data
    run_script(SCRIPT, "--dataset", path, "--total-steps", "20", "--eval-every", "1000", "--target-returns", "-200",
               "--seed", "7", "--save-model", *TINY[:-2], "--log-every", "10", cwd=in_tmp)
    checkpoint = os.path.join(only_run_dir(in_tmp), "decision_transformer.pt")
    logged = dict(read_scalars(only_run_dir(in_tmp))["eval/return_target_-200"])[20]
    own = run_script(SCRIPT, "--eval-checkpoint", checkpoint, "--eval-episodes", "2", cwd=in_tmp).stdout
    other = run_script(SCRIPT, "--eval-checkpoint", checkpoint, "--eval-episodes", "2", "--eval-seed", "1",
                       cwd=in_tmp).stdout
    mean = lambda stdout: float(stdout.split("target -200: ")[1].split(" +-")[0])  # noqa: E731
    assert mean(own) == pytest.approx(logged, abs=0.051) and mean(other) != pytest.approx(logged, abs=0.051)


def test_atomic_write_flushes_to_disk_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(dt.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    dt.atomic_write(str(tmp_path / "file.bin"), lambda file: file.write(b"data"))
    assert len(synced) == 1 and (tmp_path / "file.bin").read_bytes() == b"data"


def test_download_without_the_hf_extra_says_how_to_install_it(tmp_path, monkeypatch):
    """minari 0.5.4 raises ImportError from minari/storage/remotes/huggingface.py when huggingface_hub is missing."""
    pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if `minari[hf]` were not installed
    monkeypatch.delitem(sys.modules, "minari.storage.remotes.huggingface", raising=False)
    with pytest.raises(SystemExit) as error:
        dt.load_dataset("someone/missing-v0", download=True)
    assert 'pip install "minari[hf]"' in str(error.value) and "internet" not in str(error.value)


def test_minari_datasets_are_evaluated_on_the_env_their_metadata_records(in_tmp, monkeypatch, pendulum_data):
    """The dataset records an evaluation env with other arguments (50-step episodes, gravity 5): evaluation uses it,
    as Minari's recover_environment(eval_env=True) would, and so does a checkpoint of the run."""
    _, data = pendulum_data
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(in_tmp / "minari"))
    write_minari_dataset("tests/pendulum/eval-env-v0", data, eval_env=gym.make("Pendulum-v1", max_episode_steps=50,
                                                                               g=5.0))
    seen = []
    real_evaluate = dt.evaluate

    def evaluate(model, env_fn, *args):
        env = env_fn()
        seen.append((env.spec.max_episode_steps, env.unwrapped.g, args[-2]))
        return real_evaluate(model, env_fn, *args)

    monkeypatch.setattr(dt, "evaluate", evaluate)
    common = dict(cuda=False, context_len=5, embed_dim=32, n_layers=1, batch_size=16, eval_episodes=1,
                  target_returns=[-200.0])
    dt.main(dt.Args(dataset="tests/pendulum/eval-env-v0", total_steps=2, log_every=1, save_model=True, **common))
    dt.main(dt.Args(eval_checkpoint=os.path.join(only_run_dir(in_tmp), "decision_transformer.pt"), **common))
    assert seen == [(50, 5.0, 50)] * 2


def inverted_pendulum_antagonist(obs: np.ndarray) -> float:
    """The balancing controller with its sign flipped: it pushes the pole over within a few steps."""
    return -inverted_pendulum_controller(obs)


def mixed_learning_run(folder):
    data = write_dataset(os.path.join(folder, "mixed.npz"), "InvertedPendulum-v5",
                         [inverted_pendulum_controller, inverted_pendulum_antagonist], [0.3, 0.3], episodes=40)
    low = float(np.round(data["episode_returns"][1::2].mean()))
    result = run_script(SCRIPT, "--dataset", "mixed.npz", "--total-steps", "500", "--eval-every", "100000",
                        "--context-len", "10", "--embed-dim", "64", "--n-layers", "2", "--batch-size", "64",
                        "--learning-rate", "1e-3", "--warmup-steps", "100", "--reward-scale", "100",
                        "--target-returns", "1000", f"{low:g}", "--eval-episodes", "5", "--log-every", "500",
                        cwd=folder)
    return data, low, result


@pytest.mark.learning
@pytest.mark.background(job=mixed_learning_run)
def test_return_conditioning_selects_good_or_bad_behaviour():
    """The data mixes episodes of a balancing controller (return up to 1000) and of its sign-flipped antagonist
    (a few steps). Conditioned on 1000 the model must balance; conditioned on the antagonist's return it must not.
    Plain behaviour cloning, which ignores R, scores the same under both targets and fails this test."""
    data, low, result = background(mixed_learning_run)
    good, bad = data["episode_returns"][0::2], data["episode_returns"][1::2]
    assert good.mean() > 900 and bad.max() < 30, (good, bad)
    high_return = float(result.stdout.split("final evaluation (target 1000): ")[1].split(" +-")[0])
    low_return = float(result.stdout.split(f"final evaluation (target {low:g}): ")[1].split(" +-")[0])
    print(f"good episodes {good.mean():.1f}, bad {bad.mean():.1f}; DT at 1000: {high_return:.1f}, at {low:g}: "
          f"{low_return:.1f}")
    assert high_return > 500 and high_return > 5 * low_return


# ----------------------------------------------------------------------------------------------------------------------
# Exact resume: a run stopped at any moment after a checkpoint and resumed ends as if it had never stopped
# ----------------------------------------------------------------------------------------------------------------------
RESUMED = ("model", "optimizer", "scheduler", "generator", "random_state", "task", "global_step")  # all but args, name
WALL_CLOCK_TAGS = {"charts/SPS"}


def training_scalars(run_dir: str) -> dict:
    return {tag: values for tag, values in read_scalars(run_dir).items() if tag not in WALL_CLOCK_TAGS}


def evaluations_after(stdout: str, step: int) -> list[str]:
    """The evaluation lines printed for steps after `step` ("eval at step N (target R): ..."), and the final ones."""
    return [line for line in stdout.splitlines() if line.startswith("final evaluation")
            or line.startswith("eval at step") and int(line.split()[3]) > step]


def test_a_run_killed_after_a_checkpoint_and_resumed_ends_as_the_uninterrupted_run(tmp_path, pendulum_data):
    """SIGKILL after a checkpoint and events past it, then `--resume CHECKPOINT` alone: the same evaluations
    after the checkpoint, the same final weights, optimiser, scheduler and generators, the same TensorBoard scalars
    (the killed run's events up to its checkpoint kept, later ones dropped) but the wall-clock speed."""
    path, _ = pendulum_data
    cli = ["--dataset", path, "--total-steps", "200", "--eval-every", "80", "--target-returns", "-200",
           "--save-model", *TINY]
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    full = run_script(SCRIPT, *cli, cwd=str(tmp_path / "full"))
    checkpoint = run_killed_after_checkpoint(SCRIPT, *cli, "--checkpoint-every", "30", cwd=str(tmp_path / "killed"),
                                             checkpoint_name="decision_transformer.pt")
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 30 <= step < 200
    resumed = run_script(SCRIPT, "--resume", checkpoint, cwd=str(tmp_path / "killed"))
    assert not resumed.stderr, resumed.stderr  # not even a warning from the command line's second parse
    assert evaluations_after(resumed.stdout, step) == evaluations_after(full.stdout, step)
    progress = [line for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert progress[0].startswith(f"step {(step // 20 + 1) * 20}/200 ")  # continues after the checkpoint (log-every 20)
    ends = [torch.load(os.path.join(only_run_dir(str(tmp_path / name)), "decision_transformer.pt"), weights_only=True)
            for name in ("full", "killed")]
    assert_same_tensors(*({key: end[key] for key in RESUMED} for end in ends))
    assert training_scalars(only_run_dir(str(tmp_path / "killed"))) == training_scalars(
        only_run_dir(str(tmp_path / "full")))


def test_resuming_from_an_earlier_checkpoint_drops_the_later_events_and_repeats_the_run(in_tmp, pendulum_data,
                                                                                       monkeypatch):
    """The kill test's purge, made deterministic: resumed from the step-40 checkpoint of a finished run (its folder
    holds every event up to step 100), the run writes the steps after 40 again. TensorBoard must show each scalar
    once, as before (those of step 40 kept, the later ones replaced), and the run must end as it did."""
    path, _ = pendulum_data
    copies, atomic_write = {}, dt.atomic_write

    def keep_every_checkpoint(target, write):
        atomic_write(target, write)
        step = torch.load(target, weights_only=True)["global_step"]
        copies[step] = f"step{len(copies)}.pt"
        shutil.copy(target, copies[step])

    monkeypatch.setattr(dt, "atomic_write", keep_every_checkpoint)
    dt.main(dt.parse_args(["--dataset", path, "--total-steps", "100", "--eval-every", "50", "--target-returns",
                           "-200", "--save-model", "--checkpoint-every", "20", *TINY[:-4], "--eval-episodes", "1",
                           "--log-every", "10"]))
    assert sorted(copies) == [20, 40, 50, 60, 80, 100]
    run_dir = only_run_dir(str(in_tmp))
    before, end = training_scalars(run_dir), torch.load(copies[100], weights_only=True)
    dt.main(dt.parse_args(["--resume", copies[40]]))
    assert training_scalars(run_dir) == before
    again = torch.load(os.path.join(run_dir, "decision_transformer.pt"), weights_only=True)
    assert_same_tensors({key: end[key] for key in RESUMED}, {key: again[key] for key in RESUMED})


def test_resume_refuses_what_would_not_continue_the_run_and_accepts_its_own_flags(in_tmp, pendulum_data):
    """A flag that contradicts the checkpoint fails with one line naming it, and so do another device and other data
    under the run's dataset path; the run's own flags are accepted, and a higher --total-steps extends the run
    exactly as if it had been asked for from the start."""
    shutil.copy(pendulum_data[0], "data.npz")
    cli = ["--dataset", "data.npz", "--total-steps", "20", "--eval-every", "1000", "--target-returns", "-200",
           *TINY[:-4], "--eval-episodes", "1", "--log-every", "10"]
    dt.main(dt.parse_args([*cli, "--save-model", "--exp-name", "short"]))
    checkpoint = glob.glob("runs/*short*/decision_transformer.pt")[0]
    cases = [(["--seed", "7"], "error: --seed 7 contradicts the checkpoint (1); a resumed run keeps its own settings: "
              "drop the flag, or start a new run"), (["--dataset", "other.npz"], "--dataset other.npz contradicts"),
             (["--embed-dim", "64"], "--embed-dim 64"), (["--no-torch-deterministic"], "--torch-deterministic False"),
             ([], "--total-steps 20 must exceed the checkpoint's step 20")]
    for flags, fragment in cases:
        with pytest.raises(SystemExit) as error:
            dt.main(dt.parse_args(["--resume", checkpoint, *flags]))
        assert "\n" not in str(error.value) and fragment in str(error.value), (fragment, str(error.value))
    torch.save({**torch.load(checkpoint, weights_only=True), "device": "cuda"}, "cuda.pt")
    with pytest.raises(SystemExit, match="the run trained on cuda, not cpu"):
        dt.main(dt.parse_args(["--resume", "cuda.pt", "--total-steps", "40"]))
    dt.main(dt.parse_args(["--resume", checkpoint, *cli, "--total-steps", "40"]))  # the run's own flags, extended
    dt.main(dt.parse_args([*cli, "--total-steps", "40", "--save-model", "--exp-name", "long"]))
    extended, long = (torch.load(glob.glob(f"runs/*{name}*/*.pt")[0], weights_only=True) for name in ("short", "long"))
    assert extended["global_step"] == 40
    assert_same_tensors({key: extended[key] for key in RESUMED}, {key: long[key] for key in RESUMED})
    write_pendulum_dataset("data.npz", episodes=30, seed=1)  # other data under the run's own path
    with pytest.raises(SystemExit, match="is not the data of the run"):
        dt.main(dt.parse_args(["--resume", checkpoint, "--total-steps", "60"]))


def test_random_states_survive_weights_only_loading(tmp_path):
    """numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: random_state stores a tensor."""
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save({"random_state": dt.random_state()}, tmp_path / "state.pt")
    draws = lambda: (random.random(), np.random.rand(), np.random.normal(), torch.rand(1).item())  # noqa: E731
    first = draws()
    dt.set_random_state(torch.load(tmp_path / "state.pt", weights_only=True)["random_state"])
    assert draws() == first
