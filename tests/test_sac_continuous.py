"""Tests of sac_continuous.py: the maths, the training loop's bookkeeping, the CLI, learning, and bad input."""

import copy
import glob
import math
import os
import shutil
import sys
import time
import types

import numpy as np
import pytest
import torch
from conftest import (all_finite, assert_minari_equals_npz, assert_resume_is_exact, assert_same_tensors, background,
                      evaluation_returns, only_run_dir, read_scalars, record_buffer_adds, run_script,
                      wandb_offline_tags)

import sac_continuous as sac

SCRIPT = "sac_continuous.py"


def tiny_args(**overrides) -> sac.Args:
    """A few hundred steps with small networks: enough to exercise every code path quickly."""
    settings = dict(env_id="Pendulum-v1", total_timesteps=300, learning_starts=100, batch_size=32, hidden_dim=32,
                    eval_every=150, eval_episodes=2, log_every=50, seed=3)
    settings.update(overrides)
    return sac.Args(**settings)


# ----------------------------------------------------------------------------------------------------------------------
# Maths
# ----------------------------------------------------------------------------------------------------------------------
def test_squashed_gaussian_log_prob_matches_tanh_transformed_normal():
    """Against torch.distributions' Normal pushed through TanhTransform, in float64, on moderate pre-tanh values."""
    torch.manual_seed(0)
    mean, log_std = torch.randn(64, 4, dtype=torch.float64), torch.rand(64, 4, dtype=torch.float64) * 2 - 1.5
    u = mean + log_std.exp() * torch.randn(64, 4, dtype=torch.float64)
    u = u.clamp(-4, 4)  # keep tanh(u) invertible in float64 for the reference's atanh
    reference = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.transforms.TanhTransform()]
    ).log_prob(torch.tanh(u)).sum(-1)
    eps = (u - mean) / log_std.exp()  # the noise that draws u from N(mean, std^2)
    torch.testing.assert_close(sac.squashed_gaussian_log_prob(u, eps, log_std), reference, rtol=1e-9, atol=1e-9)


def test_squashed_gaussian_log_prob_gradients_match_the_density_at_the_reparameterised_sample():
    """Written with eps, log mu has the value and the gradients (through u = mean + std eps) of the density
    log N(u; mean, std^2) evaluated at the sample, which is what the policy loss differentiates."""
    torch.manual_seed(6)
    mean = torch.randn(32, 3, dtype=torch.float64, requires_grad=True)
    log_std = (torch.rand(32, 3, dtype=torch.float64) - 0.5).requires_grad_()
    eps = torch.randn(32, 3, dtype=torch.float64)
    u = mean + log_std.exp() * eps
    ours = sac.squashed_gaussian_log_prob(u, eps, log_std)
    reference = (torch.distributions.Normal(mean, log_std.exp()).log_prob(u)
                 - torch.log(1 - torch.tanh(u) ** 2)).sum(-1)
    torch.testing.assert_close(ours, reference)
    weights = torch.randn(32, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(ours, [mean, log_std], weights, retain_graph=True),
                         torch.autograd.grad(reference, [mean, log_std], weights)):
        torch.testing.assert_close(got, want)


def test_squashed_gaussian_log_prob_is_finite_and_exact_when_saturated():
    """Where tanh(u) rounds to +-1, the naive log(1 - tanh(u)^2) is -inf; ours must match the exact value
    log N(u) + 2 log cosh(u), with log cosh(u) = logaddexp(u, -u) - log 2, computed independently in numpy."""
    u = torch.tensor([[-30.0, 12.0, 25.0], [9.5, -15.0, 40.0]], dtype=torch.float32)
    mean = torch.tensor([[-29.0, 11.0, 24.0], [9.0, -14.0, 39.0]], dtype=torch.float32)
    log_std = torch.zeros_like(u)
    ours = sac.squashed_gaussian_log_prob(u, u - mean, log_std)  # std 1: eps = u - mean
    assert torch.isfinite(ours).all()
    u64, mean64 = u.double().numpy(), mean.double().numpy()
    log_normal = -0.5 * (u64 - mean64) ** 2 - 0.5 * math.log(2 * math.pi)
    log_cosh = np.logaddexp(u64, -u64) - math.log(2.0)
    exact = (log_normal + 2.0 * log_cosh).sum(-1)
    np.testing.assert_allclose(ours.double().numpy(), exact, rtol=1e-5)
    naive = torch.distributions.Normal(mean, 1.0).log_prob(u) - torch.log(1 - torch.tanh(u) ** 2)
    assert not torch.isfinite(naive.sum(-1)).all()  # the reason for the stable form


def test_actor_sample_log_prob_is_the_density_of_the_sampled_action():
    """The log-prob returned with a sample is that of the sampled action (a Monte-Carlo entropy check: for a
    1-D policy with fixed mean/std, E[-log pi] matches numerical integration of the squashed density)."""
    torch.manual_seed(1)
    actor = sac.Actor(obs_dim=2, act_dim=1, hidden_dim=8, log_std_min=-20, log_std_max=2)
    obs = torch.zeros(200_000, 2)
    with torch.no_grad():
        actions, log_prob = actor.sample(obs)
        mean, log_std = actor(obs[:1])
    assert actions.abs().max() <= 1.0
    a = torch.linspace(-1 + 1e-6, 1 - 1e-6, 400_001, dtype=torch.float64)
    u = torch.atanh(a)
    density = (torch.distributions.Normal(mean.double()[0, 0], log_std.double().exp()[0, 0]).log_prob(u).exp()
               / (1 - a ** 2))
    entropy = torch.trapezoid(-density * torch.log(density.clamp_min(1e-300)), a)
    assert abs(-log_prob.mean().item() - entropy.item()) < 0.01


def test_twin_q_network_equals_two_separate_mlps():
    """The stacked (2, ...) weights compute exactly what two ordinary MLPs with the same weights would, and so do
    their gradients (the in-place ReLUs must not corrupt the backward pass)."""
    torch.manual_seed(2)
    qf = sac.TwinQNetwork(obs_dim=5, act_dim=2, hidden_dim=16).double()
    obs, actions = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    out = qf(obs, actions)
    assert out.shape == (2, 7)
    layers = [(qf.w1, qf.b1), (qf.w2, qf.b2), (qf.w3, qf.b3)]
    reference = []
    for i in range(2):
        x = torch.cat([obs, actions], -1)
        for layer, (weight, bias) in enumerate(layers):
            x = x @ weight[i] + bias[i, 0]
            x = torch.relu(x) if layer < 2 else x
        reference.append(x.squeeze(-1))
    reference = torch.stack(reference)
    torch.testing.assert_close(out, reference)
    upstream = torch.randn(2, 7, dtype=torch.float64)
    params = [actions, *qf.parameters()]
    ours = torch.autograd.grad(out, params, upstream)
    expected = torch.autograd.grad(reference, params, upstream)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)


def test_soft_q_target_masks_terminations_but_not_truncations():
    """y = r + gamma (1 - terminated) (min Q'(s', a') - alpha log pi(a'|s')): a terminated row keeps only r; a
    truncated-but-not-terminated row (stored with terminated = 0) bootstraps like any other row."""
    torch.manual_seed(3)
    actor, qf_target = sac.Actor(3, 2, 16, -20, 2), sac.TwinQNetwork(3, 2, 16)
    rewards, next_obs = torch.randn(6, 1), torch.randn(6, 3)
    terminations = torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0], [1.0]])
    alpha, gamma = torch.tensor(0.3), 0.97
    torch.manual_seed(4)
    target = sac.soft_q_target(actor, qf_target, rewards, terminations, next_obs, alpha, gamma)
    torch.manual_seed(4)  # same eps for the independent computation
    with torch.no_grad():
        next_actions, next_log_prob = actor.sample(next_obs)
        q = qf_target(next_obs, next_actions)
        bootstrap = torch.minimum(q[0], q[1]) - alpha * next_log_prob
    expected = torch.where(terminations[:, 0] == 1, rewards[:, 0], rewards[:, 0] + gamma * bootstrap)
    torch.testing.assert_close(target, expected)
    assert torch.equal(target[[0, 2, 5]], rewards[[0, 2, 5], 0])


def test_alpha_loss_gradient_pushes_entropy_toward_target():
    """Eq. 18: when the policy's entropy is below the target, alpha must grow (gradient on log alpha negative)."""
    log_alpha = torch.tensor(0.0, requires_grad=True)
    low_entropy_log_prob = torch.full((10,), 5.0)  # entropy -5 < target -1
    sac.alpha_loss_fn(log_alpha, low_entropy_log_prob, target_entropy=-1.0).backward()
    assert log_alpha.grad < 0
    log_alpha.grad = None
    sac.alpha_loss_fn(log_alpha, torch.full((10,), -5.0), target_entropy=-1.0).backward()
    assert log_alpha.grad > 0


def test_alpha_loss_gradient_matches_the_hand_computed_derivative():
    """Eq. (18) through log alpha: d/d log_alpha of -exp(log_alpha) mean(log pi + H_bar) is
    -exp(log_alpha) mean(log pi + H_bar)."""
    log_alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    log_prob = torch.tensor([-1.5, 0.2, 2.0, -0.7], dtype=torch.float64)
    sac.alpha_loss_fn(log_alpha, log_prob, target_entropy=-2.0).backward()
    expected = -math.exp(0.3) * np.mean([-1.5 - 2.0, 0.2 - 2.0, 2.0 - 2.0, -0.7 - 2.0])
    assert log_alpha.grad.item() == pytest.approx(expected, rel=1e-12)


def test_actor_loss_uses_the_minimum_of_the_twin_q_values_and_trains_only_the_policy():
    """Eqs. (7) and (9): J_pi = mean(alpha log pi(a|s) - min_i Q_i(s, a)), a = f_phi(eps; s); its gradient reaches
    every policy parameter and no critic parameter."""
    torch.manual_seed(8)
    actor, qf = sac.Actor(3, 2, 16, -20, 2), sac.TwinQNetwork(3, 2, 16)
    obs, alpha = torch.randn(64, 3), torch.tensor(0.3)
    with torch.no_grad():
        qf.b3.zero_()  # so that neither critic is the smaller one everywhere
    torch.manual_seed(9)
    loss, _ = sac.actor_loss_fn(actor, qf, obs, alpha)
    torch.manual_seed(9)  # the same eps for the independent computation
    with torch.no_grad():
        actions, log_prob = actor.sample(obs)
        q = qf(obs, actions)
    assert (q[0] < q[1]).any() and (q[1] < q[0]).any()  # each critic is the minimum somewhere
    torch.testing.assert_close(loss, (alpha * log_prob - torch.minimum(q[0], q[1])).mean())
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in qf.parameters())
    assert all(p.grad is not None and p.grad.any() for p in actor.parameters())


def make_learner(**overrides):
    """Small networks, optimisers and one fixed batch for calling `update` directly; the target critic starts
    different from the online one, so a target computed with the wrong network shows."""
    torch.manual_seed(9)
    actor, qf, qf_target = sac.Actor(3, 2, 16, -20, 2), sac.TwinQNetwork(3, 2, 16), sac.TwinQNetwork(3, 2, 16)
    qf_target.requires_grad_(False)
    log_alpha = torch.tensor(math.log(0.5), requires_grad=True)
    optimizers = tuple(torch.optim.Adam(group, lr=1e-2) for group in (qf.parameters(), actor.parameters(), [log_alpha]))
    batch = (torch.randn(32, 3), torch.rand(32, 2) * 2 - 1, torch.randn(32, 1), (torch.rand(32, 1) < 0.3).float(),
             torch.randn(32, 3))
    return actor, qf, qf_target, log_alpha, optimizers, batch, sac.Args(tau=0.1, gamma=0.9, **overrides)


def test_polyak_update_moves_every_target_tensor_toward_the_online_one_by_tau():
    """Algorithm 1, last line: theta_bar <- tau theta + (1 - tau) theta_bar, for every tensor of both critics, with
    theta the critics after this step's gradient step."""
    actor, qf, qf_target, log_alpha, optimizers, batch, args = make_learner()
    before = [param.clone() for param in qf_target.parameters()]
    sac.update(actor, qf, qf_target, log_alpha, optimizers, batch, 0, args, target_entropy=-2.0)
    targets, onlines = list(qf_target.parameters()), list(qf.parameters())
    assert len(targets) == len(before) == 6
    for target, online, old in zip(targets, onlines, before):
        assert not torch.equal(target, old)
        torch.testing.assert_close(target, old + 0.1 * (online - old))


def test_bellman_target_uses_the_target_critics():
    """Eqs. (2)-(5) in `update`: y = r + gamma (1 - d) (min_i Q_bar_i(s', a') - alpha log pi(a'|s')) with the target
    critics Q_bar, computed here by hand from copies of the networks taken before the step."""
    actor, qf, qf_target, log_alpha, optimizers, batch, args = make_learner()
    obs, actions, rewards, terminations, next_obs = batch
    actor0, qf0, qf_target0, alpha0 = copy.deepcopy(actor), copy.deepcopy(qf), copy.deepcopy(qf_target), 0.5
    torch.manual_seed(10)
    metrics = sac.update(actor, qf, qf_target, log_alpha, optimizers, batch, 0, args, target_entropy=-2.0)
    with torch.no_grad():
        torch.manual_seed(10)  # the first random draw of the step is a' ~ pi(.|s')
        next_actions, next_log_prob = actor0.sample(next_obs)

        def losses_with(critic):
            next_value = critic(next_obs, next_actions).min(dim=0).values - alpha0 * next_log_prob
            y = rewards[:, 0] + 0.9 * (1 - terminations[:, 0]) * next_value
            return 0.5 * (qf0(obs, actions) - y).pow(2).mean(dim=1)

    torch.testing.assert_close(metrics["qf_losses"], losses_with(qf_target0))
    assert not torch.allclose(metrics["qf_losses"], losses_with(qf0))  # the online critics give another target


def test_clear_grads_empties_every_parameter_group_like_zero_grad():
    """Every parameter of every group must start the next step without stale gradients, exactly as
    optimizer.zero_grad(set_to_none=True) leaves them."""
    actor, log_alpha = sac.Actor(3, 2, 8, -20, 2), torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([{"params": actor.parameters()}, {"params": [log_alpha]}])
    (actor(torch.randn(4, 3))[0].sum() + log_alpha).backward()
    assert all(p.grad is not None for group in optimizer.param_groups for p in group["params"])
    sac.clear_grads(optimizer)
    assert all(p.grad is None for group in optimizer.param_groups for p in group["params"])


def test_env_action_scaling_respects_each_dimension_bounds():
    low, high = np.array([-2.0, 0.0, 10.0]), np.array([2.0, 1.0, 30.0])
    np.testing.assert_allclose(sac.to_env_action(np.array([-1.0, -1.0, -1.0]), low, high), low)
    np.testing.assert_allclose(sac.to_env_action(np.array([1.0, 1.0, 1.0]), low, high), high)
    np.testing.assert_allclose(sac.to_env_action(np.zeros(3), low, high), [0.0, 0.5, 20.0])


# ----------------------------------------------------------------------------------------------------------------------
# The training loop's bookkeeping (in-process, with the replay buffer observed)
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def recorded_adds(monkeypatch):
    return record_buffer_adds(monkeypatch, sac.ReplayBuffer)


def test_truncation_is_stored_as_non_terminal(in_tmp, recorded_adds):
    """Pendulum-v1 only ever truncates (200-step limit): no stored transition may be marked terminated."""
    sac.main(tiny_args(total_timesteps=450))
    assert len(recorded_adds) == 450
    assert not any(terminated for _, _, _, terminated, _ in recorded_adds)


def test_termination_is_stored_with_the_real_final_observation(in_tmp, recorded_adds):
    """Hopper-v5 terminates when it falls: those steps are stored terminated, with next_obs the real final
    observation (not the first observation of the next episode), and the next stored obs is the reset one."""
    sac.main(tiny_args(env_id="Hopper-v5", total_timesteps=300, learning_starts=300, eval_episodes=1))
    ends = [i for i, (_, _, _, terminated, _) in enumerate(recorded_adds) if terminated]
    assert len(ends) >= 3  # random actions make the hopper fall within a few dozen steps
    for i, record in enumerate(recorded_adds[:-1]):
        next_obs, following_obs = record[4], recorded_adds[i + 1][0]
        if i in ends:
            assert not np.allclose(next_obs, following_obs)  # a reset happened in between
            # Hopper terminates when unhealthy: height obs[0] <= 0.7 or |torso angle obs[1]| >= 0.2. The stored
            # next_obs must show that fall; a reset observation (height ~1.25, angle ~0) never would.
            assert next_obs[0] <= 0.7 or abs(next_obs[1]) >= 0.2, next_obs[:2]
        else:
            np.testing.assert_array_equal(next_obs, following_obs)  # within an episode, s_t+1 is the next s_t


# ----------------------------------------------------------------------------------------------------------------------
# Command line, learning, determinism, checkpoints, datasets
# ----------------------------------------------------------------------------------------------------------------------
def test_cli_run_performs_updates_and_logs_finite_metrics(tmp_path):
    run_script(SCRIPT, "--env-id", "Hopper-v5", "--total-timesteps", "400", "--learning-starts", "150",
               "--batch-size", "64", "--eval-every", "200", "--eval-episodes", "2", "--log-every", "50",
               cwd=str(tmp_path))
    scalars = read_scalars(only_run_dir(str(tmp_path)))
    for tag in ["losses/qf1_loss", "losses/qf2_loss", "losses/qf_loss", "losses/qf1_values", "losses/qf2_values",
                "losses/actor_loss", "losses/alpha_loss", "charts/alpha", "charts/entropy", "charts/SPS",
                "charts/episodic_return", "charts/episodic_length", "eval/episodic_return", "eval/normalized_score"]:
        assert tag in scalars, f"{tag} missing; logged: {sorted(scalars)}"
        assert all_finite(v for _, v in scalars[tag]), tag
    # Updates began at step 150: losses are logged from the first logging step after it, at every one after.
    assert [step for step, _ in scalars["losses/actor_loss"]] == [200, 250, 300, 350, 400]
    alphas = [v for _, v in scalars["charts/alpha"]]
    assert alphas[0] < 1.0 and alphas == sorted(alphas, reverse=True)  # alpha moved (down, as entropy is high)
    assert [step for step, _ in scalars["eval/episodic_return"]] == [200, 400]


def pendulum_learning_run(folder):
    return run_script(SCRIPT, "--env-id", "Pendulum-v1", "--total-timesteps", "6000", "--learning-starts", "1000",
                      "--eval-every", "2000", "--eval-episodes", "10", "--log-every", "2000", "--seed", "1",
                      cwd=folder)


@pytest.mark.learning
@pytest.mark.background(job=pendulum_learning_run)
def test_learns_pendulum():
    """Pendulum-v1: a random policy scores about -1200 at every evaluation. SAC must reach a mean evaluation return
    of at least -300 within 6k steps (the issue allows 15k) for this fixed seed, and not have collapsed at the end
    (single evaluations dip: this seed scores -180 to -130 from 4k steps on, but -450 at exactly 8k)."""
    result = background(pendulum_learning_run)
    returns = evaluation_returns(result.stdout)
    print(returns)
    assert len(returns) == 3 and returns[0] < -300  # it starts far from the threshold
    assert max(returns) >= -300 and returns[-1] >= -600, returns


def test_same_seed_gives_identical_evaluation_returns_on_cpu(in_tmp):
    first = sac.main(tiny_args(cuda=False))
    second = sac.main(tiny_args(cuda=False))
    np.testing.assert_array_equal(first, second)
    other_seed = sac.main(tiny_args(cuda=False, seed=4))
    assert not np.array_equal(first, other_seed)


@pytest.fixture
def first_update_state(monkeypatch):
    """Copies of what the training loop hands to its first `update` call (the state right after set-up or resume)."""
    captured = {}
    real_update = sac.update

    def update(actor, qf, qf_target, log_alpha, optimizers, *rest, **kwargs):
        if not captured:
            captured.update(copy.deepcopy(dict(
                actor=actor.state_dict(), qf=qf.state_dict(), qf_target=qf_target.state_dict(), log_alpha=log_alpha,
                optimizers=[optimizer.state_dict() for optimizer in optimizers])))
        return real_update(actor, qf, qf_target, log_alpha, optimizers, *rest, **kwargs)

    monkeypatch.setattr(sac, "update", update)
    return captured


def test_checkpoint_round_trip_and_resume(in_tmp, first_update_state):
    returns = sac.main(tiny_args(save_model=True, seed=5))
    first_update_state.clear()
    checkpoint = glob.glob("runs/*/sac_continuous.pt")
    assert len(checkpoint) == 1 and not glob.glob("runs/*/*.tmp*")
    state = torch.load(checkpoint[0], weights_only=True)
    assert state["global_step"] == 300 and {"actor", "qf", "qf_target", "log_alpha", "q_optimizer",
                                             "actor_optimizer", "alpha_optimizer", "args"} <= set(state)
    # Evaluation-only mode uses the checkpoint's seed (not --seed's default 1), so it reproduces the run's final
    # evaluation exactly; --eval-seed gives other start states.
    np.testing.assert_array_equal(sac.main(sac.Args(eval_checkpoint=checkpoint[0], eval_episodes=2)), returns)
    other = sac.main(sac.Args(eval_checkpoint=checkpoint[0], eval_episodes=2, eval_seed=6))
    assert not np.array_equal(other, returns)
    with pytest.raises(SystemExit, match="must exceed the checkpoint's step"):
        sac.main(tiny_args(resume=checkpoint[0], total_timesteps=300, seed=5))
    # Extending the finished run restores the networks, the targets, log alpha and all three optimisers' states
    # (compared right before the first update after resuming) and continues from step 300.
    resumed = sac.main(tiny_args(resume=checkpoint[0], total_timesteps=400, save_model=True, seed=5))
    assert np.all(np.isfinite(resumed))
    for key in ("actor", "qf", "qf_target", "log_alpha"):
        assert_same_tensors(first_update_state[key], state[key], key)
    assert not torch.equal(state["qf_target"]["w1"], state["qf"]["w1"])  # targets are their own tensors
    for optimizer, key in zip(first_update_state["optimizers"], ("q_optimizer", "actor_optimizer", "alpha_optimizer")):
        assert len(state[key]["state"]) > 0
        assert_same_tensors(optimizer["state"], state[key]["state"], key)
    latest = torch.load(checkpoint[0], weights_only=True)  # the run goes on in its own folder
    assert latest["global_step"] == 400 and latest["replay"] == ["0-200.pt", "200-300.pt", "300-400.pt"]


RESUME_RUN = ["--env-id", "Hopper-v5", "--total-timesteps", "2500", "--learning-starts", "300", "--batch-size", "32",
              "--hidden-dim", "32", "--eval-every", "500", "--eval-episodes", "2", "--log-every", "100",
              "--save-model", "--checkpoint-every", "400", "--no-cuda", "--seed", "2"]


def test_a_run_killed_after_a_checkpoint_and_resumed_is_the_same_run(tmp_path):
    """kill -9 at whatever moment after a checkpoint, then `--resume CHECKPOINT` alone: the same evaluations, the same
    TensorBoard scalars (the speed excepted), the same final weights, optimisers and replay buffer as the run that was
    never interrupted (CPU, same machine)."""
    assert_resume_is_exact(SCRIPT, RESUME_RUN, tmp_path, ["actor", "qf", "qf_target", "log_alpha", "q_optimizer",
                                                          "actor_optimizer", "alpha_optimizer"])


def test_resume_takes_the_runs_own_settings_and_rejects_contradicting_flags(tmp_path):
    """`--resume` alone continues with the checkpoint's settings (not the defaults); repeating them is accepted; a
    flag that contradicts the checkpoint fails with one line naming it; so does a checkpoint without its replay/."""
    run_script(SCRIPT, *RESUME_RUN[:3], "300", *RESUME_RUN[4:], cwd=str(tmp_path))
    checkpoint = glob.glob(f"{tmp_path}/runs/*/{sac.SCRIPT}.pt")[0]
    for flags, fragment in [(["--env-id", "Pendulum-v1"], "--env-id Pendulum-v1 contradicts the checkpoint (Hopper"),
                            (["--seed", "1"], "--seed 1 contradicts"), (["--q-lr", "0.001"], "--q-lr 0.001 contra"),
                            (["--total-timesteps", "300"], "must exceed the checkpoint's step")]:
        result = run_script(SCRIPT, "--resume", checkpoint, "--total-timesteps", "400", *flags, cwd=str(tmp_path),
                            check=False)
        assert result.returncode != 0 and fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    extended = run_script(SCRIPT, "--resume", checkpoint, *RESUME_RUN[:3], "400", *RESUME_RUN[4:], cwd=str(tmp_path))
    assert "resumed at step 300" in extended.stdout and "Hopper-v5, obs 11" in extended.stdout
    shutil.rmtree(os.path.join(os.path.dirname(checkpoint), "replay"))
    result = run_script(SCRIPT, "--resume", checkpoint, "--total-timesteps", "500", cwd=str(tmp_path), check=False)
    assert "needs its replay/ folder beside it" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_atomic_write_flushes_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(sac.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(sac.os, "replace", lambda old, new: (events.append("replace"), real_replace(old, new))[1])
    sac.atomic_write(str(tmp_path / "file.bin"), lambda file: file.write(b"data"))
    assert events == ["fsync", "replace"] and (tmp_path / "file.bin").read_bytes() == b"data"


def test_progress_reports_the_speed_of_the_last_interval_without_warm_up_or_evaluations(in_tmp, monkeypatch, capsys):
    """A fake clock: environment steps take no time, each gradient step 1 s, each evaluation 1000 s. Every interval
    after the warm-up runs at exactly 1 step/s, which an average since the start (warm-up and evaluations
    included) would not show; intervals that end in the warm-up give no ETA."""
    clock = [0.0]
    monkeypatch.setattr(sac, "time", types.SimpleNamespace(time=time.time, perf_counter=lambda: clock[0]))
    real_update, real_evaluate = sac.update, sac.evaluate

    def update(*args, **kwargs):
        clock[0] += 1.0
        return real_update(*args, **kwargs)

    def evaluate(*args, **kwargs):
        clock[0] += 1000.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sac, "update", update)
    monkeypatch.setattr(sac, "evaluate", evaluate)
    sac.main(tiny_args())  # 300 steps, updates from step 100 on, a progress line every 50, evaluations at 150 and 300
    lines = [line.split(" | ")[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines[:2] == [[lines[0][0], "ETA after warm-up"], [lines[1][0], "ETA after warm-up"]]
    assert lines[2:] == [["1 SPS", "ETA 0h02m30s"], ["1 SPS", "ETA 0h01m40s"], ["1 SPS", "ETA 0h00m50s"],
                         ["1 SPS", "ETA 0h00m00s"]]


def test_dataset_export_round_trip(sac_minari_export):
    """--export-replay writes every training transition in the docs/datasets.md layout; per-episode reward sums equal
    the episodic returns logged to TensorBoard. --export-rollouts writes the final policy's rollouts."""
    folder, _ = sac_minari_export
    assert sorted(os.listdir(folder)) == ["minari", "replay.npz", "rollouts.npz", "runs"]  # no temporary files left
    obs_dim, act_dim = 11, 3
    for name, rows in [("replay.npz", 500), ("rollouts.npz", 300)]:
        data = np.load(folder / name)
        expected = {"observations": (np.float32, (rows, obs_dim)), "actions": (np.float32, (rows, act_dim)),
                    "rewards": (np.float32, (rows,)), "next_observations": (np.float32, (rows, obs_dim)),
                    "terminals": (np.bool_, (rows,)), "timeouts": (np.bool_, (rows,))}
        for key, (dtype, shape) in expected.items():
            assert data[key].dtype == dtype and data[key].shape == shape, (name, key)
        assert str(data["env_id"]) == "Hopper-v5" and "sac_continuous.py" in str(data["source"])
        assert float(data["ref_min_score"]) == pytest.approx(-20.272305)
        assert np.all(data["actions"] >= -1.0) and np.all(data["actions"] <= 1.0)  # Hopper's own bounds
        ends = data["terminals"] | data["timeouts"]
        assert ends.sum() >= 2
        within_episode = ~ends[:-1]
        np.testing.assert_array_equal(data["next_observations"][:-1][within_episode],
                                      data["observations"][1:][within_episode])

    data = np.load(folder / "replay.npz")
    boundaries = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    episode_sums = [chunk.sum(dtype=np.float64) for chunk in np.split(data["rewards"], boundaries)[:-1]]
    logged = [value for _, value in read_scalars(only_run_dir(str(folder)))["charts/episodic_return"]]
    np.testing.assert_allclose(episode_sums, logged, rtol=1e-4)


def test_minari_export_holds_the_transitions_of_the_npz_export(sac_minari_export, monkeypatch):
    """--export-minari and --export-rollouts-minari, through the real CLI in the same run as the .npz exports."""
    pytest.importorskip("minari")
    folder, root = sac_minari_export
    monkeypatch.setenv("MINARI_DATASETS_PATH", root)
    replay = assert_minari_equals_npz("local/hopper-test-replay-v0", str(folder / "replay.npz"), "SAC")
    assert replay["terminals"].any() and not (replay["terminals"][-1] or replay["timeouts"][-1])  # what is tested
    assert_minari_equals_npz("local/hopper-test-rollouts-v0", str(folder / "rollouts.npz"), "SAC")


def test_taken_malformed_or_unsupported_minari_ids_fail_at_start_up(in_tmp, monkeypatch):
    minari = pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(in_tmp / "minari"))
    episode = minari.data_collector.EpisodeBuffer(observations=np.zeros((3, 3), np.float32),
                                                  actions=np.zeros((2, 1), np.float32), rewards=np.zeros(2),
                                                  terminations=np.zeros(2, bool), truncations=np.array([0, 1], bool))
    minari.create_dataset_from_buffers("local/taken-v0", [episode], env="Pendulum-v1", description="taken")
    for overrides, fragment in [(dict(export_minari="local/taken-v0"), "already exists"),
                                (dict(export_rollouts_minari="local/taken-v0"), "minari delete local/taken-v0"),
                                (dict(export_minari="pendulum"), "namespace/name-vN"),
                                (dict(export_minari="local/a-v0", export_rollouts_minari="local/a-v0"), "different")]:
        with pytest.raises(SystemExit) as error:
            sac.main(tiny_args(**overrides))
        assert "\n" not in str(error.value) and fragment in str(error.value), str(error.value)
    monkeypatch.setitem(sys.modules, "minari", None)  # as if minari were not installed
    with pytest.raises(SystemExit, match="--export-minari needs minari: pip install minari"):
        sac.main(tiny_args(export_minari="local/new-v0"))
    assert not os.path.exists("runs")  # nothing started


def test_minari_export_that_fails_after_training_is_written_to_the_run_folder(in_tmp, monkeypatch, capsys):
    """Another process takes the dataset id while this one trains: the transitions land in runs/{run_name}/ as an
    .npz, the output says where, and no staging folder is left among the Minari datasets."""
    pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(in_tmp / "minari"))
    real_evaluate = sac.evaluate

    def evaluate(*args, **kwargs):
        os.makedirs("minari/local/late-v0/data", exist_ok=True)
        open("minari/local/late-v0/data/metadata.json", "w").close()
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sac, "evaluate", evaluate)
    sac.main(tiny_args(export_minari="local/late-v0"))
    out, run_dir = capsys.readouterr().out, only_run_dir(".")
    fallback = os.path.join("runs", os.path.basename(run_dir), "local_late-v0.npz")
    assert "cannot write Minari dataset local/late-v0" in out and f"writing {fallback} instead" in out, out
    assert np.load(fallback)["rewards"].shape == (300,)
    assert sorted(os.listdir("minari")) == ["local"]


def test_unwritable_export_path_fails_at_start_up(in_tmp):
    """A path whose folder exists but takes no new file (for root too) must fail before training, not after it."""
    for overrides in (dict(export_replay="/proc/x.npz"), dict(export_rollouts="/proc/x.npz")):
        with pytest.raises(SystemExit) as error:
            sac.main(tiny_args(**overrides))
        assert "cannot write there" in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists("runs")  # nothing started


def test_export_that_fails_after_training_is_written_to_the_run_folder(in_tmp, monkeypatch, capsys):
    """The export folder turns into a file during training (writable at start-up, unwritable at the end, for root
    too): both datasets land in runs/{run_name}/ and the output says where."""
    real_evaluate = sac.evaluate

    def evaluate(*args, **kwargs):
        if os.path.isdir("data"):
            shutil.rmtree("data")
            open("data", "w").close()
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(sac, "evaluate", evaluate)
    sac.main(tiny_args(export_replay="data/replay.npz", export_rollouts="data/rollouts.npz", export_rollout_steps=50))
    out, run_dir = capsys.readouterr().out, only_run_dir(".")
    for name, rows in [("replay.npz", 300), ("rollouts.npz", 50)]:
        fallback = os.path.join("runs", os.path.basename(run_dir), name)
        assert f"cannot write data/{name}" in out and f"writing {fallback} instead" in out, out
        assert f"wrote {rows} transitions to {fallback}" in out
        assert np.load(fallback)["rewards"].shape == (rows,)


def test_track_sends_training_metrics_to_wandb(tmp_path):
    """--track through the real CLI with wandb's offline mode: the run file must hold the TensorBoard scalars."""
    pytest.importorskip("wandb")
    run_script(SCRIPT, "--env-id", "Pendulum-v1", "--total-timesteps", "200", "--learning-starts", "100",
               "--batch-size", "32", "--hidden-dim", "32", "--eval-every", "1000", "--eval-episodes", "1",
               "--log-every", "50", "--track", cwd=str(tmp_path),
               env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    tags = wandb_offline_tags(str(tmp_path))
    assert {"losses/qf_loss", "losses/actor_loss", "charts/alpha", "charts/SPS", "eval/episodic_return"} <= tags, tags


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the fix, never a traceback
# ----------------------------------------------------------------------------------------------------------------------
def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sac_continuous.py: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_errors_are_one_line(tmp_path):
    assert_one_line_error(run_script(SCRIPT, "--env-id", "CartPole-v1", cwd=str(tmp_path), check=False),
                          "Discrete", "Box")
    (tmp_path / "corrupt.pt").write_bytes(b"this is not a checkpoint")
    assert_one_line_error(run_script(SCRIPT, "--eval-checkpoint", "corrupt.pt", cwd=str(tmp_path), check=False),
                          "corrupt", "--save-model")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(env_id="NoSuchEnv-v0"), "--env-id"),
        (dict(env_id="CartPole-v1"), "continuous Box"),
        (dict(eval_checkpoint="missing.pt"), "does not exist"),
        (dict(batch_size=0), "--batch-size must be > 0"),
        (dict(seed=-1), "--seed"),
        (dict(resume="a.pt", eval_checkpoint="b.pt"), "not both"),
        (dict(export_replay="."), "--export-replay"),
        (dict(tau=2.0), "--tau"),
        (dict(gamma=1.5), "--gamma"),
        (dict(log_std_min=3.0), "--log-std-min"),
        (dict(learning_starts=-1), "--learning-starts"),
    ],
)
def test_bad_arguments_fail_with_one_line(in_tmp, overrides, fragment):
    with pytest.raises(SystemExit) as error:
        sac.main(tiny_args(**overrides))
    message = str(error.value)
    assert "\n" not in message and fragment in message, message


def test_checkpoint_from_another_script_is_rejected(in_tmp):
    torch.save({"script": "td3_continuous", "version": 1}, "td3.pt")
    with pytest.raises(SystemExit, match="written by td3_continuous, not sac_continuous.py"):
        sac.main(sac.Args(eval_checkpoint="td3.pt"))
    torch.save([1, 2, 3], "list.pt")
    with pytest.raises(SystemExit, match="another program"):
        sac.main(sac.Args(eval_checkpoint="list.pt"))
    torch.save({"script": "sac_continuous", "version": 2, "args": {}}, "old.pt")  # before alpha_optimizer
    with pytest.raises(SystemExit, match=f"format version 2, this script reads version {sac.CHECKPOINT_VERSION}; re-"):
        sac.main(sac.Args(eval_checkpoint="old.pt"))


def test_capture_video_without_moviepy_names_the_install(in_tmp):
    try:
        import moviepy  # noqa: F401

        pytest.skip("moviepy is installed here")
    except ImportError:
        pass
    with pytest.raises(SystemExit, match="pip install moviepy"):
        sac.main(tiny_args(capture_video=True))


def test_a_step_both_terminated_and_truncated_is_stored_as_terminal_only():
    """docs/datasets.md: timeouts mark non-terminal ends; a terminal step at the time limit is a termination."""
    log = sac.TransitionLog(3, obs_dim=2, act_dim=1)
    for terminated, truncated in [(False, False), (True, True), (False, True)]:
        log.add(np.zeros(2), np.zeros(1), 1.0, np.ones(2), terminated, truncated)
    assert log.arrays["terminals"].tolist() == [False, True, False]
    assert log.arrays["timeouts"].tolist() == [False, False, True]


def test_capture_video_writes_mp4_files(tmp_path):
    """With moviepy installed and a rendering backend (MUJOCO_GL=egl here), the final evaluation is recorded."""
    pytest.importorskip("moviepy")
    result = run_script(SCRIPT, "--env-id", "Hopper-v5", "--total-timesteps", "200", "--learning-starts", "100",
                        "--batch-size", "32", "--hidden-dim", "32", "--eval-episodes", "2", "--capture-video",
                        cwd=str(tmp_path), check=False, env={"MUJOCO_GL": "egl"})
    if result.returncode != 0 and "cannot render" in result.stderr:
        pytest.skip(f"no rendering backend here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert len(glob.glob(str(tmp_path / "videos" / "*" / "*.mp4"))) == 2


def test_a_warm_up_as_long_as_the_run_is_announced_at_start_up(in_tmp, capsys):
    """--learning-starts >= --total-timesteps trains nothing: said before the first step, not left to the reader of
    the final evaluation."""
    sac.main(tiny_args(total_timesteps=100, learning_starts=100, eval_every=100))
    output = capsys.readouterr().out
    assert output.index("warning: --learning-starts (100) >= --total-timesteps (100)") < output.index("run ")
    sac.main(tiny_args(total_timesteps=100, learning_starts=99, eval_every=100))
    assert "warning" not in capsys.readouterr().out
