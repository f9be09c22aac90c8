"""Tests of td3_continuous.py: noise, targets, delayed updates, the loop's bookkeeping, CLI, learning, bad input."""

import contextlib
import glob
import os

import numpy as np
import pytest
import torch
from conftest import (all_finite, assert_minari_equals_npz, assert_resume_is_exact, background, evaluation_returns,
                      only_run_dir, read_scalars, record_buffer_adds, run_script, wandb_offline_tags)

import td3_continuous as td3

SCRIPT = "td3_continuous.py"


def tiny_args(**overrides) -> td3.Args:
    settings = dict(env_id="Pendulum-v1", total_timesteps=300, learning_starts=100, batch_size=32, hidden_dims=(32, 32),
                    eval_every=150, eval_episodes=2, log_every=50, seed=3)
    settings.update(overrides)
    return td3.Args(**settings)


class ConstantActor(torch.nn.Module):
    """A stand-in policy that always outputs the same action (in [-1, 1] policy units)."""

    def __init__(self, action):
        super().__init__()
        self.action = torch.as_tensor(action, dtype=torch.float32)

    def forward(self, obs):
        return self.action.expand(obs.shape[0], -1)


def make_update_inputs(seed: int, obs_dim=3, act_dim=2, batch=8):
    """Small online and target networks that differ (separately initialised), their optimizers, and a filled buffer."""
    torch.manual_seed(seed)
    nets = dict(actor=td3.Actor(obs_dim, act_dim, (16, 16)), actor_target=td3.Actor(obs_dim, act_dim, (16, 16)),
                qf=td3.TwinQNetwork(obs_dim, act_dim, (16, 16)), qf_target=td3.TwinQNetwork(obs_dim, act_dim, (16, 16)))
    nets["actor_target"].requires_grad_(False), nets["qf_target"].requires_grad_(False)
    optimizers = dict(actor_optimizer=torch.optim.Adam(nets["actor"].parameters(), lr=1e-2),
                      q_optimizer=torch.optim.Adam(nets["qf"].parameters(), lr=1e-2))
    rb = td3.ReplayBuffer(32, obs_dim, act_dim, torch.device("cpu"))
    for i in range(32):
        rb.add(np.random.randn(obs_dim), np.random.uniform(-1, 1, act_dim), np.random.randn(), i % 5 == 0,
               np.random.randn(obs_dim))
    return rb, nets, optimizers, tiny_args(batch_size=batch, tau=0.1, gamma=0.9)


# An action space with asymmetric, unequal bounds per dimension.
LOW, HIGH = np.array([-1.0, 0.0, 5.0, -30.0]), np.array([1.0, 3.0, 6.0, 10.0])


# ----------------------------------------------------------------------------------------------------------------------
# Noise and targets
# ----------------------------------------------------------------------------------------------------------------------
def test_target_policy_smoothing_is_clipped_scaled_per_dimension_and_in_bounds():
    torch.manual_seed(0)
    half_range = (HIGH - LOW) / 2
    # In the middle of the range: the noise is clipped to +-c, i.e. +-c * half_range in each dimension's env units.
    middle = td3.smoothed_target_actions(ConstantActor([0.0] * 4), torch.zeros(100_000, 3), 0.2, 0.5)
    noise_env_units = td3.to_env_action(middle.numpy(), LOW, HIGH) - td3.to_env_action(np.zeros(4), LOW, HIGH)
    assert np.all(np.abs(noise_env_units) <= 0.5 * half_range + 1e-5)
    np.testing.assert_allclose(np.abs(noise_env_units).max(0), 0.5 * half_range, rtol=1e-4)  # the clip is reached
    # Per-dimension std in env units is sigma * half_range (slightly less, from the clipping at 2.5 sigma).
    np.testing.assert_allclose(noise_env_units.std(0) / half_range, 0.2 * 0.9875, rtol=0.02)
    # Near the bounds: the smoothed action never leaves any dimension's own [low, high].
    edge = td3.smoothed_target_actions(ConstantActor([0.99, -0.99, 1.0, -1.0]), torch.zeros(10_000, 3), 0.2, 0.5)
    env_actions = td3.to_env_action(edge.numpy(), LOW, HIGH)
    assert np.all(env_actions >= LOW - 1e-6) and np.all(env_actions <= HIGH + 1e-6)
    assert np.all(env_actions[:, 2] <= 6.0) and np.any(env_actions[:, 2] == 6.0)  # clipped, not wrapped


def test_exploration_noise_is_independent_per_dimension():
    torch.manual_seed(1)
    actions = td3.explore(ConstantActor([0.0, 0.0, 0.0]), torch.zeros(200_000, 3), noise_std=0.1).numpy()
    np.testing.assert_allclose(actions.std(0), 0.1, rtol=0.02)
    correlation = np.corrcoef(actions.T)[np.triu_indices(3, 1)]
    assert np.all(np.abs(correlation) < 0.01)  # no noise shared between dimensions
    # ...and between the rows of a batch (CleanRL's single noise vector broadcast over environments would fail this)
    assert np.abs(np.corrcoef(actions[:-1, 0], actions[1:, 0])[0, 1]) < 0.01
    clipped = td3.explore(ConstantActor([0.98, -0.98, 0.0]), torch.zeros(10_000, 3), noise_std=0.1)
    assert clipped.abs().max() <= 1.0


def test_evaluation_uses_no_exploration_noise(in_tmp, monkeypatch):
    """Evaluation returns equal a noise-free rollout of the same actor, and never call the exploration function."""
    import gymnasium as gym

    torch.manual_seed(2)
    actor = td3.Actor(3, 1, (16, 16))
    monkeypatch.setattr(td3, "explore", lambda *a, **k: pytest.fail("evaluation must not add exploration noise"))
    returns = td3.evaluate(actor, td3.make_env("Pendulum-v1", 0), episodes=2, seed=7, device=torch.device("cpu"))
    env = gym.make("Pendulum-v1")
    for episode in range(2):
        obs, _ = env.reset(seed=7 + episode)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
            obs, reward, terminated, truncated, _ = env.step(td3.to_env_action(action, env.action_space.low,
                                                                               env.action_space.high))
            total, done = total + reward, terminated or truncated
        assert returns[episode] == pytest.approx(total, rel=1e-6)


def test_bellman_target_masks_terminations_but_not_truncations(monkeypatch):
    """The per-critic losses of update() against an independent computation with the same smoothing noise: terminal
    rows regress to r alone, the others (truncated ones included: the buffer stores no truncation) bootstrap."""
    rb, nets, optimizers, args = make_update_inputs(seed=3)
    obs, actions, next_obs, rewards = torch.randn(6, 3), torch.rand(6, 2) * 2 - 1, torch.randn(6, 3), torch.randn(6, 1)
    terminations = torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0], [1.0]])
    monkeypatch.setattr(rb, "sample", lambda batch_size: (obs, actions, rewards, terminations, next_obs))
    torch.manual_seed(4)
    with torch.no_grad():
        next_actions = td3.smoothed_target_actions(nets["actor_target"], next_obs, 0.2, 0.5)
        next_q = nets["qf_target"](next_obs, next_actions)
        target = torch.where(terminations[:, 0] == 1, rewards[:, 0],
                             rewards[:, 0] + 0.9 * torch.minimum(next_q[0], next_q[1]))
        expected = ((nets["qf"](obs, actions) - target) ** 2).mean(1)
    torch.manual_seed(4)  # the same smoothing noise inside update()
    metrics = td3.update(rb, **nets, **optimizers, args=args, update_actor=False)
    torch.testing.assert_close(metrics["qf_losses"], expected)


def test_actor_loss_uses_the_first_critic_only_and_does_not_train_critics():
    torch.manual_seed(5)
    actor, qf = td3.Actor(3, 2, (16, 16)), td3.TwinQNetwork(3, 2, (16, 16))
    with torch.no_grad():
        qf.b3[0] += 1.0  # make Q1 > Q2 everywhere, so that Q1 differs from min(Q1, Q2)
    obs = torch.randn(8, 3)
    loss = td3.actor_loss_fn(actor, qf, obs)
    with torch.no_grad():
        q = qf(obs, actor(obs))
        assert loss.item() == pytest.approx(-q[0].mean().item(), rel=1e-6)
        assert loss.item() != pytest.approx(-q.min(0).values.mean().item(), rel=1e-3)
    loss.backward()
    assert all(p.grad is None for p in qf.parameters())
    assert all(p.grad is not None for p in actor.parameters())


def test_actor_and_targets_update_every_policy_frequency_critic_updates(in_tmp, monkeypatch):
    """Count, during a real run, the critic updates, the actor updates and the target updates."""
    calls = {"critic": 0, "actor": [], "targets": []}
    real_critic, real_actor, real_soft_update = td3.critic_loss_fn, td3.actor_loss_fn, td3.soft_update

    def critic(*args, **kwargs):
        calls["critic"] += 1
        return real_critic(*args, **kwargs)

    def actor(*args, **kwargs):
        calls["actor"].append(calls["critic"])
        return real_actor(*args, **kwargs)

    def soft_update(target_params, online_params, tau):
        calls["targets"].append((calls["critic"], len(target_params), len(online_params)))
        real_soft_update(target_params, online_params, tau)

    monkeypatch.setattr(td3, "critic_loss_fn", critic)
    monkeypatch.setattr(td3, "actor_loss_fn", actor)
    monkeypatch.setattr(td3, "soft_update", soft_update)
    td3.main(tiny_args(total_timesteps=220, learning_starts=100, policy_frequency=3))
    assert calls["critic"] == 120
    assert calls["actor"] == list(range(3, 121, 3))  # after critic updates 3, 6, ..., 120
    # one call per actor update, over both networks: the critics' 6 tensors and the actor's 6
    assert calls["targets"] == [(n, 12, 12) for n in range(3, 121, 3)]


def test_polyak_update_moves_every_target_tensor_toward_the_online_one_by_exactly_tau():
    rb, nets, optimizers, args = make_update_inputs(seed=6)
    pairs = [("qf_target", "qf"), ("actor_target", "actor")]
    before = {name: [p.clone() for p in nets[name].parameters()] for name, _ in pairs}
    td3.update(rb, **nets, **optimizers, args=args, update_actor=False)
    for name, _ in pairs:  # between delayed updates the targets stay where they are
        for old, new in zip(before[name], nets[name].parameters()):
            torch.testing.assert_close(new, old, rtol=0, atol=0)
    td3.update(rb, **nets, **optimizers, args=args, update_actor=True)
    moved = 0
    for target_name, online_name in pairs:  # theta' <- tau theta + (1 - tau) theta', theta after this step's update
        for old, new, online in zip(before[target_name], nets[target_name].parameters(),
                                    nets[online_name].parameters()):
            assert not torch.equal(old, online)
            torch.testing.assert_close(new, old + 0.1 * (online - old), rtol=1e-6, atol=1e-7)
            moved += 1
    assert moved == 12  # the critics' 6 tensors and the actor's 6


def test_bellman_target_uses_the_target_critics_and_the_target_actor(monkeypatch):
    """y computed by hand from the target networks' weights, with the same smoothing noise; the online networks
    (which differ) must not enter it."""
    rb, nets, optimizers, args = make_update_inputs(seed=7)
    batch = rb.sample(8)
    obs, actions, rewards, terminations, next_obs = batch
    monkeypatch.setattr(rb, "sample", lambda batch_size: batch)
    seen = {}
    real_critic_loss = td3.critic_loss_fn

    def critic_loss(qf, obs, actions, target):
        seen["target"] = target
        return real_critic_loss(qf, obs, actions, target)

    monkeypatch.setattr(td3, "critic_loss_fn", critic_loss)
    torch.manual_seed(8)
    td3.update(rb, **nets, **optimizers, args=args, update_actor=False)
    torch.manual_seed(8)  # the smoothing noise update() drew: 0.2 N(0, 1) per dimension, clipped to +-0.5
    noise = (0.2 * torch.randn(8, 2)).clamp(-0.5, 0.5)
    with torch.no_grad():
        a = nets["actor_target"]
        hidden = torch.relu(a.fc2(torch.relu(a.fc1(next_obs))))
        next_actions = (torch.tanh(hidden @ a.fc3.weight.T + a.fc3.bias) + noise).clamp(-1, 1)
        q = nets["qf_target"]
        x = torch.cat([next_obs, next_actions], 1)
        next_q = [torch.relu(torch.relu(x @ q.w1[i] + q.b1[i]) @ q.w2[i] + q.b2[i]) @ q.w3[i] + q.b3[i] for i in (0, 1)]
        y = rewards + 0.9 * (1 - terminations) * torch.minimum(next_q[0], next_q[1])
    torch.testing.assert_close(seen["target"], y[:, 0])


def test_env_action_scaling_respects_each_dimension_bounds():
    np.testing.assert_allclose(td3.to_env_action(-np.ones(4), LOW, HIGH), LOW)
    np.testing.assert_allclose(td3.to_env_action(np.ones(4), LOW, HIGH), HIGH)


# ----------------------------------------------------------------------------------------------------------------------
# The training loop's bookkeeping
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def recorded_adds(monkeypatch):
    return record_buffer_adds(monkeypatch, td3.ReplayBuffer)


def test_truncation_is_stored_as_non_terminal(in_tmp, recorded_adds):
    td3.main(tiny_args(total_timesteps=450))
    assert len(recorded_adds) == 450
    assert not any(terminated for _, _, _, terminated, _ in recorded_adds)


def test_termination_is_stored_with_the_real_final_observation(in_tmp, recorded_adds):
    td3.main(tiny_args(env_id="Hopper-v5", total_timesteps=300, learning_starts=300, eval_episodes=1))
    ends = [i for i, (_, _, _, terminated, _) in enumerate(recorded_adds) if terminated]
    assert len(ends) >= 3
    for i, record in enumerate(recorded_adds[:-1]):
        next_obs, following_obs = record[4], recorded_adds[i + 1][0]
        if i in ends:
            assert next_obs[0] <= 0.7 or abs(next_obs[1]) >= 0.2, next_obs[:2]  # Hopper's unhealthy final state
        else:
            np.testing.assert_array_equal(next_obs, following_obs)


def test_progress_reports_the_last_interval_without_warm_up_or_evaluations(monkeypatch):
    """1000 random warm-up steps in 1 s, then 1000 training steps in 10 s around a 50 s evaluation: 100 SPS and an
    ETA of 8000 / 100 s. An average since the start would say 2000 / 61 s = 33 SPS."""
    clock = [100.0]
    monkeypatch.setattr(td3.time, "perf_counter", lambda: clock[0])
    progress = td3.Progress(step=0, total=10_000)
    clock[0] += 1.0
    assert progress.tick(1000, warming_up=True) == (1000.0, "after warm-up")
    clock[0] += 4.0
    with progress.paused():
        clock[0] += 50.0
    clock[0] += 6.0
    assert progress.tick(2000) == (pytest.approx(100.0), "0h01m20s")


def test_training_loop_flags_the_warm_up_and_pauses_the_clock_for_evaluations(in_tmp, monkeypatch):
    ticks, paused = [], [False]

    class RecordingProgress(td3.Progress):
        def tick(self, step, warming_up=False):
            ticks.append((step, warming_up))
            return super().tick(step, warming_up)

        @contextlib.contextmanager
        def paused(self):
            with super().paused():
                paused[0] = True
                yield
                paused[0] = False

    real_evaluate = td3.evaluate

    def evaluate(*args, **kwargs):
        assert paused[0], "evaluation time counted as training time"
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(td3, "Progress", RecordingProgress)
    monkeypatch.setattr(td3, "evaluate", evaluate)
    td3.main(tiny_args(total_timesteps=300, learning_starts=100, log_every=50, eval_every=150))
    assert ticks == [(50, True), (100, True), (150, False), (200, False), (250, False), (300, False)]


# ----------------------------------------------------------------------------------------------------------------------
# Command line, learning, determinism, checkpoints, datasets
# ----------------------------------------------------------------------------------------------------------------------
def test_cli_run_performs_updates_and_logs_finite_metrics(tmp_path):
    run_script(SCRIPT, "--env-id", "Hopper-v5", "--total-timesteps", "400", "--learning-starts", "150",
               "--batch-size", "64", "--eval-every", "200", "--eval-episodes", "2", "--log-every", "50",
               cwd=str(tmp_path))
    scalars = read_scalars(only_run_dir(str(tmp_path)))
    for tag in ["losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss", "losses/qf1_values", "losses/qf2_values",
                "losses/actor_loss", "charts/SPS", "charts/episodic_return", "charts/episodic_length",
                "eval/episodic_return", "eval/normalized_score"]:
        assert tag in scalars, f"{tag} missing; logged: {sorted(scalars)}"
        assert all_finite(v for _, v in scalars[tag]), tag
    assert [step for step, _ in scalars["losses/qf1_loss"]] == [200, 250, 300, 350, 400]
    assert [step for step, _ in scalars["eval/episodic_return"]] == [200, 400]


def test_track_sends_losses_and_charts_to_weights_and_biases(tmp_path):
    """--track with wandb's offline mode (a real client, no network): its run file must hold the TensorBoard
    metrics, which wandb only sees from writers created after wandb.init."""
    run_script(SCRIPT, "--env-id", "Pendulum-v1", "--total-timesteps", "300", "--learning-starts", "100",
               "--batch-size", "32", "--hidden-dims", "32", "32", "--eval-every", "300", "--eval-episodes", "1",
               "--log-every", "100", "--track", cwd=str(tmp_path),
               env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    tags = wandb_offline_tags(str(tmp_path))
    for tag in ["losses/qf_loss", "losses/actor_loss", "charts/SPS", "charts/episodic_return", "eval/episodic_return"]:
        assert tag in tags, f"{tag} not sent to wandb; sent: {sorted(tags)}"


def pendulum_learning_run(folder):
    return run_script(SCRIPT, "--env-id", "Pendulum-v1", "--total-timesteps", "8000", "--learning-starts", "1000",
                      "--eval-every", "2000", "--eval-episodes", "10", "--log-every", "2000", "--seed", "1",
                      cwd=folder)


@pytest.mark.learning
@pytest.mark.background(job=pendulum_learning_run)
def test_learns_pendulum():
    """Pendulum-v1: a random policy scores about -1200 at every evaluation. TD3 must reach a mean evaluation return
    of at least -300 within 8k steps (the issue allows 20k) for this fixed seed, and not have collapsed at the end
    (this seed: -1460 and -1130 at 2k and 4k, -190 at 6k, -140 at 8k)."""
    result = background(pendulum_learning_run)
    returns = evaluation_returns(result.stdout)
    print(returns)
    assert len(returns) == 4 and returns[0] < -300  # it starts far from the threshold
    assert max(returns) >= -300 and returns[-1] >= -600, returns


def test_same_seed_gives_identical_evaluation_returns_on_cpu(in_tmp):
    first = td3.main(tiny_args(cuda=False))
    second = td3.main(tiny_args(cuda=False))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, td3.main(tiny_args(cuda=False, seed=4)))


def test_checkpoint_round_trip_and_resume(in_tmp):
    returns = td3.main(tiny_args(save_model=True))
    checkpoint = glob.glob("runs/*/td3_continuous.pt")
    assert len(checkpoint) == 1 and not glob.glob("runs/*/*.tmp*")
    state = torch.load(checkpoint[0], weights_only=True)
    assert state["global_step"] == 300 and {"actor", "actor_target", "qf", "qf_target", "q_optimizer",
                                             "actor_optimizer", "args"} <= set(state)
    # Evaluation-only mode without --seed uses the run's own seed (3, not the default 1): the run's final returns.
    np.testing.assert_array_equal(td3.main(td3.Args(eval_checkpoint=checkpoint[0], eval_episodes=2)), returns)
    other_seed = td3.main(td3.Args(eval_checkpoint=checkpoint[0], eval_episodes=2, eval_seed=4))
    assert not np.array_equal(other_seed, returns)
    with pytest.raises(SystemExit, match="must exceed the checkpoint's step"):
        td3.main(tiny_args(resume=checkpoint[0], total_timesteps=300))
    td3.main(tiny_args(resume=checkpoint[0], total_timesteps=400, save_model=True))  # extends the finished run
    assert torch.load(checkpoint[0], weights_only=True)["global_step"] == 400  # in the run's own folder


RESUME_RUN = ["--env-id", "Hopper-v5", "--total-timesteps", "2500", "--learning-starts", "300", "--batch-size", "32",
              "--hidden-dims", "32", "32", "--eval-every", "500", "--eval-episodes", "2", "--log-every", "100",
              "--save-model", "--checkpoint-every", "400", "--no-cuda", "--seed", "2"]


def test_a_run_killed_after_a_checkpoint_and_resumed_is_the_same_run(tmp_path):
    """kill -9 at whatever moment after a checkpoint, then `--resume CHECKPOINT` alone: the same run as the one never
    interrupted, bit for bit (CPU, same machine), the delayed actor updates included."""
    assert_resume_is_exact(SCRIPT, RESUME_RUN, tmp_path, ["actor", "actor_target", "qf", "qf_target", "q_optimizer",
                                                          "actor_optimizer"])


def test_resume_of_another_env_or_settings_fails_with_one_line(tmp_path):
    """A flag that contradicts the checkpoint fails naming it (this used to train the checkpoint's Pendulum and exit
    0); repeating the run's own flags is accepted."""
    run_script(SCRIPT, "--env-id", "Pendulum-v1", "--total-timesteps", "200", "--learning-starts", "100",
               "--batch-size", "16", "--hidden-dims", "16", "16", "--eval-every", "200", "--eval-episodes", "1",
               "--save-model", cwd=str(tmp_path))
    checkpoint = glob.glob(f"{tmp_path}/runs/*/{td3.SCRIPT}.pt")[0]
    for flags, fragment in [(["--env-id", "Hopper-v5"], "--env-id Hopper-v5 contradicts the checkpoint (Pendulum-v1)"),
                            (["--policy-frequency", "3"], "--policy-frequency 3 contradicts"),
                            (["--hidden-dims", "16", "32"], "--hidden-dims (16, 32) contradicts")]:
        result = run_script(SCRIPT, "--resume", checkpoint, "--total-timesteps", "300", *flags, cwd=str(tmp_path),
                            check=False)
        assert result.returncode != 0 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_script(SCRIPT, "--resume", checkpoint, "--total-timesteps", "300", "--env-id", "Pendulum-v1",
                        "--hidden-dims", "16", "16", "--seed", "1", cwd=str(tmp_path))
    assert "resumed at step 200" in result.stdout


def test_paper_network_widths_are_settable_and_recorded_in_the_checkpoint(tmp_path):
    """--hidden-dims 400 300 (the paper's networks) builds a 400-300 actor and twin critics, which the checkpoint
    records and evaluation-only mode rebuilds."""
    run_script(SCRIPT, "--env-id", "Pendulum-v1", "--total-timesteps", "60", "--learning-starts", "40",
               "--batch-size", "8", "--hidden-dims", "400", "300", "--eval-every", "60", "--eval-episodes", "1",
               "--save-model", cwd=str(tmp_path))
    path = glob.glob(str(tmp_path / "runs" / "*" / "td3_continuous.pt"))[0]
    state = torch.load(path, weights_only=True)
    assert tuple(state["args"]["hidden_dims"]) == (400, 300)
    shapes = {name: tuple(tensor.shape) for part in ("actor", "qf") for name, tensor in state[part].items()}
    assert shapes == {"fc1.weight": (400, 3), "fc1.bias": (400,), "fc2.weight": (300, 400), "fc2.bias": (300,),
                      "fc3.weight": (1, 300), "fc3.bias": (1,), "w1": (2, 4, 400), "b1": (2, 1, 400),
                      "w2": (2, 400, 300), "b2": (2, 1, 300), "w3": (2, 300, 1), "b3": (2, 1, 1)}
    result = run_script(SCRIPT, "--eval-checkpoint", path, "--eval-episodes", "1", cwd=str(tmp_path))
    assert "--hidden-dims (400, 300) from the checkpoint" in result.stdout


def test_resume_restores_targets_and_both_optimizer_states(in_tmp, monkeypatch):
    """The tensors themselves, as update() first sees them after --resume: networks, target networks and the Adam
    states (step counts and moments) of both optimizers equal the checkpoint's."""
    td3.main(tiny_args(save_model=True))
    path = glob.glob("runs/*/td3_continuous.pt")[0]
    saved = torch.load(path, weights_only=True)

    class Seen(Exception):
        pass

    def update(rb, actor, actor_target, qf, qf_target, actor_optimizer, q_optimizer, args, **kwargs):
        modules = dict(actor=actor, actor_target=actor_target, qf=qf, qf_target=qf_target)
        for name, module in modules.items():
            for key, tensor in module.state_dict().items():
                torch.testing.assert_close(tensor, saved[name][key], rtol=0, atol=0, msg=f"{name}.{key}")
        for key in saved["actor"]:  # the targets lag the online networks, so the check above tells them apart
            assert not torch.equal(saved["actor"][key], saved["actor_target"][key])
        for name, optimizer in [("q_optimizer", q_optimizer), ("actor_optimizer", actor_optimizer)]:
            state, expected = optimizer.state_dict()["state"], saved[name]["state"]
            assert state.keys() == expected.keys() and len(state) == 6
            for index in state:
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(state[index][key], expected[index][key], rtol=0, atol=0)
        raise Seen

    monkeypatch.setattr(td3, "update", update)
    with pytest.raises(Seen):
        td3.main(tiny_args(resume=path, total_timesteps=500))


def test_dataset_export_round_trip(tmp_path, monkeypatch):
    """Both exports as .npz and as Minari datasets (through Minari's own API) from the same run hold the same
    transitions; per-episode reward sums equal the logged episodic returns."""
    pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    run_script(SCRIPT, "--env-id", "Hopper-v5", "--total-timesteps", "500", "--learning-starts", "200",
               "--batch-size", "32", "--hidden-dims", "32", "32", "--eval-every", "1000", "--eval-episodes", "1",
               "--export-replay", "data/replay.npz", "--export-rollouts", "data/rollouts.npz",
               "--export-rollout-steps", "300", "--export-minari", "local/hopper-td3-replay-v0",
               "--export-rollouts-minari", "local/hopper-td3-rollouts-v0", cwd=str(tmp_path))
    for name, dataset_id in [("replay.npz", "local/hopper-td3-replay-v0"),
                             ("rollouts.npz", "local/hopper-td3-rollouts-v0")]:
        assert_minari_equals_npz(dataset_id, str(tmp_path / "data" / name), "TD3")
    assert sorted(os.listdir(tmp_path / "data")) == ["replay.npz", "rollouts.npz"]
    for name, rows in [("replay.npz", 500), ("rollouts.npz", 300)]:
        data = np.load(tmp_path / "data" / name)
        expected = {"observations": (np.float32, (rows, 11)), "actions": (np.float32, (rows, 3)),
                    "rewards": (np.float32, (rows,)), "next_observations": (np.float32, (rows, 11)),
                    "terminals": (np.bool_, (rows,)), "timeouts": (np.bool_, (rows,))}
        for key, (dtype, shape) in expected.items():
            assert data[key].dtype == dtype and data[key].shape == shape, (name, key)
        assert str(data["env_id"]) == "Hopper-v5" and "td3_continuous.py" in str(data["source"])
        assert np.all(np.abs(data["actions"]) <= 1.0)
        ends = data["terminals"] | data["timeouts"]
        within_episode = ~ends[:-1]
        np.testing.assert_array_equal(data["next_observations"][:-1][within_episode],
                                      data["observations"][1:][within_episode])
    data = np.load(tmp_path / "data" / "replay.npz")
    boundaries = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    episode_sums = [chunk.sum(dtype=np.float64) for chunk in np.split(data["rewards"], boundaries)[:-1]]
    logged = [value for _, value in read_scalars(only_run_dir(str(tmp_path)))["charts/episodic_return"]]
    np.testing.assert_allclose(episode_sums, logged, rtol=1e-4)


def test_taken_or_malformed_minari_ids_fail_at_start_up_before_training(in_tmp, monkeypatch):
    pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(in_tmp / "minari"))
    monkeypatch.setattr(td3, "update", lambda *a, **k: pytest.fail("trained although the dataset id is unusable"))
    os.makedirs("minari/local/taken-v0/data")  # what any dataset leaves, written or half-written
    for flag, dataset_id, fragment in [("export_minari", "local/taken-v0", "already exists"),
                                       ("export_rollouts_minari", "local/taken-v0", "minari delete"),
                                       ("export_minari", "no-version", "namespace/name-vN")]:
        with pytest.raises(SystemExit, match=f"--{flag.replace('_', '-')} {dataset_id}: .*{fragment}"):
            td3.main(tiny_args(**{flag: dataset_id}))
    assert not os.path.exists("runs")


def test_unwritable_export_path_fails_at_start_up_before_training(in_tmp, monkeypatch):
    """/proc accepts no new files (for root too): the start-up check must create a real file, not ask os.access."""
    monkeypatch.setattr(td3, "update", lambda *a, **k: pytest.fail("trained although the export path is unwritable"))
    for flag in ("export_replay", "export_rollouts"):
        with pytest.raises(SystemExit, match=f"--{flag.replace('_', '-')} /proc/x.npz: cannot write there"):
            td3.main(tiny_args(**{flag: "/proc/x.npz"}))
    assert not os.path.exists("runs") and not glob.glob("/proc/x.npz.probe*")


def test_export_that_fails_after_training_is_written_into_the_run_folder(in_tmp, monkeypatch, capsys):
    """Disk full or folder removed after hours of training: the data goes to runs/{run_name}/ and the log says so."""
    real_atomic_write = td3.atomic_write

    def atomic_write(path, write):
        if path.startswith("data/"):
            raise OSError(28, "No space left on device")
        real_atomic_write(path, write)

    monkeypatch.setattr(td3, "atomic_write", atomic_write)
    td3.main(tiny_args(total_timesteps=200, export_replay="data/replay.npz", export_rollouts="data/rollouts.npz",
                       export_rollout_steps=50))
    run_dir = os.path.relpath(only_run_dir("."))
    assert np.load(os.path.join(run_dir, "replay.npz"))["rewards"].shape == (200,)
    assert np.load(os.path.join(run_dir, "rollouts.npz"))["rewards"].shape == (50,)
    output = capsys.readouterr().out
    assert f"cannot write data/replay.npz (No space left on device); writing {run_dir}/replay.npz instead" in output
    assert f"wrote 50 transitions to {run_dir}/rollouts.npz" in output


def test_atomic_write_flushes_to_disk_before_the_rename(in_tmp, monkeypatch):
    events = []
    monkeypatch.setattr(td3.os, "fsync", lambda fd: events.append(("fsync", os.fstat(fd).st_size)))
    real_replace = os.replace
    monkeypatch.setattr(td3.os, "replace", lambda src, dst: events.append(("replace", dst)) or real_replace(src, dst))
    td3.atomic_write("out/file.bin", lambda file: file.write(b"12345"))
    assert events == [("fsync", 5), ("replace", "out/file.bin")]
    assert open("out/file.bin", "rb").read() == b"12345" and os.listdir("out") == ["file.bin"]


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------
def test_cli_errors_are_one_line(tmp_path):
    for cli_args, fragment in [(("--env-id", "CartPole-v1"), "Box"), (("--policy-noise", "-1"), "--policy-noise")]:
        result = run_script(SCRIPT, *cli_args, cwd=str(tmp_path), check=False)
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert len(lines) == 1 and lines[0].startswith("td3_continuous.py: error:") and fragment in lines[0]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(env_id="NoSuchEnv-v0"), "--env-id"),
        (dict(eval_checkpoint="missing.pt"), "does not exist"),
        (dict(batch_size=0), "--batch-size must be > 0"),
        (dict(seed=-1), "--seed"),
        (dict(eval_seed=2**32), "--eval-seed"),
        (dict(resume="a.pt", eval_checkpoint="b.pt"), "not both"),
        (dict(export_replay="."), "--export-replay"),
        (dict(tau=0.0), "--tau"),
        (dict(noise_clip=-0.1), "--noise-clip"),
        (dict(policy_frequency=0), "--policy-frequency"),
    ],
)
def test_bad_arguments_fail_with_one_line(in_tmp, overrides, fragment):
    with pytest.raises(SystemExit) as error:
        td3.main(tiny_args(**overrides))
    assert "\n" not in str(error.value) and fragment in str(error.value), str(error.value)


def test_foreign_or_corrupt_checkpoint_is_rejected(in_tmp):
    torch.save({"script": "sac_continuous", "version": 1}, "sac.pt")
    with pytest.raises(SystemExit, match="written by sac_continuous, not td3_continuous.py"):
        td3.main(td3.Args(eval_checkpoint="sac.pt"))
    with open("corrupt.pt", "wb") as file:
        file.write(b"\x00garbage")
    with pytest.raises(SystemExit, match="corrupt"):
        td3.main(td3.Args(eval_checkpoint="corrupt.pt"))


def test_a_step_both_terminated_and_truncated_is_stored_as_terminal_only():
    """DATASET.md: timeouts mark non-terminal ends; a terminal step at the time limit is a termination."""
    log = td3.TransitionLog(3, obs_dim=2, act_dim=1)
    for terminated, truncated in [(False, False), (True, True), (False, True)]:
        log.add(np.zeros(2), np.zeros(1), 1.0, np.ones(2), terminated, truncated)
    assert log.arrays["terminals"].tolist() == [False, True, False]
    assert log.arrays["timeouts"].tolist() == [False, False, True]


def test_a_warm_up_as_long_as_the_run_is_announced_at_start_up(in_tmp, capsys):
    """--learning-starts >= --total-timesteps trains nothing: said before the first step, not left to the reader of
    the final evaluation."""
    td3.main(tiny_args(total_timesteps=100, learning_starts=100, eval_every=100))
    output = capsys.readouterr().out
    assert output.index("warning: --learning-starts (100) >= --total-timesteps (100)") < output.index("run ")
    td3.main(tiny_args(total_timesteps=100, learning_starts=99, eval_every=100))
    assert "warning" not in capsys.readouterr().out
