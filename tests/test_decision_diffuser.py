"""Tests of decision_diffuser.py: the diffusion maths against independent computations, guidance, inpainting, the
U-Net, data handling, the CLI, learning on Pendulum-v1, checkpoints, determinism and bad input."""

import glob
import os
import random
import shutil
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import (all_finite, assert_same_tensors, background, evaluation_returns, only_run_dir, read_scalars,
                      run_killed_after_checkpoint, run_script, wandb_offline_tags)

import decision_diffuser as dd

SCRIPT = "decision_diffuser.py"


# ----------------------------------------------------------------------------------------------------------------------
# A Pendulum-v1 dataset written by the tests themselves (docs/datasets.md layout)
# ----------------------------------------------------------------------------------------------------------------------
def swing_up_controller(obs: np.ndarray) -> float:
    """Energy-based swing-up, PD near upright. Pendulum-v1: theta'' = 15 sin(theta) + 3 u, so the energy
    E = 0.5 theta'^2 + 15 cos(theta) is 15 at the upright rest, and dE/dt = 3 u theta'."""
    cos, sin, theta_dot = obs
    theta = np.arctan2(sin, cos)
    if cos > 0.85:
        return float(np.clip(-10.0 * theta - 2.0 * theta_dot, -2.0, 2.0))
    pump = (15.0 - (0.5 * theta_dot**2 + 15.0 * cos)) * theta_dot
    return 2.0 * float(np.sign(pump)) if abs(pump) > 0.05 else 2.0


def pendulum_dataset(path, n_good=10, n_noisy=10, n_random=10, seed=0) -> np.ndarray:
    """Episodes of the controller (return about -130), of the controller with half its actions random (about -400)
    and of uniform random actions (about -1170); written to `path`. Returns the episode returns."""
    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng(seed)
    rows = {key: [] for key in dd.KEYS}
    episode_returns = []
    for i, kind in enumerate(["good"] * n_good + ["noisy"] * n_noisy + ["random"] * n_random):
        obs, _ = env.reset(seed=seed * 1000 + i)
        done, total = False, 0.0
        while not done:
            random_action = kind == "random" or (kind == "noisy" and rng.random() < 0.5)
            action = rng.uniform(-2.0, 2.0) if random_action else swing_up_controller(obs)
            next_obs, reward, terminated, truncated, _ = env.step(np.array([action], np.float32))
            for key, value in zip(dd.KEYS, (obs, [action], reward, next_obs, terminated, truncated and not terminated)):
                rows[key].append(value)
            total, obs, done = total + reward, next_obs, terminated or truncated
        episode_returns.append(total)
    data = {key: np.array(value, dtype=bool if key in ("terminals", "timeouts") else np.float32)
            for key, value in rows.items()}
    np.savez(path, env_id=np.array("Pendulum-v1"), source=np.array("tests: swing-up controller"), **data)
    return np.array(episode_returns)


TINY = ["--horizon", "8", "--dim", "16", "--dim-mults", "1", "2", "--n-diffusion-steps", "10", "--batch-size", "16",
        "--gradient-accumulate-every", "2", "--ema-start", "10", "--ema-every", "5", "--sampler", "ddim",
        "--sampling-steps", "4", "--eval-episodes", "2", "--inv-hidden-dim", "32", "--cdf-knots", "101",
        "--no-cuda"]  # CPU even on a CUDA machine: the determinism checks need it


def tiny_args(dataset, **overrides) -> dd.Args:
    settings = dict(dataset=None if dataset is None else str(dataset), horizon=8, dim=16, dim_mults=(1, 2),
                    n_diffusion_steps=10, batch_size=16, ema_start=10, ema_every=5, sampler="ddim", sampling_steps=4,
                    eval_episodes=2, inv_hidden_dim=32, cdf_knots=101, total_steps=30, eval_every=1000, log_every=10,
                    seed=3, cuda=False)
    settings.update(overrides)
    return dd.Args(**settings)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pendulum_small.npz"
    pendulum_dataset(path, n_good=2, n_noisy=1, n_random=1)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Schedule and samplers, against independent float64 computations
# ----------------------------------------------------------------------------------------------------------------------
def independent_alphas_cumprod(n_steps, s=0.008):
    f = [np.cos(((t / n_steps) + s) / (1 + s) * np.pi / 2) ** 2 for t in range(n_steps + 1)]
    betas = np.minimum([1 - f[t + 1] / f[t] for t in range(n_steps)], 0.999)
    return betas, np.cumprod(1 - betas)


def test_cosine_schedule_is_decreasing_in_unit_interval_and_matches_eq17():
    schedule = dd.CosineSchedule(200)
    alphas_cumprod = schedule.alphas_cumprod.double()
    assert torch.all(alphas_cumprod > 0) and torch.all(alphas_cumprod < 1)
    assert torch.all(alphas_cumprod[1:] < alphas_cumprod[:-1])
    assert schedule.betas.max() <= 0.999 + 1e-7
    betas, expected = independent_alphas_cumprod(200)
    np.testing.assert_allclose(alphas_cumprod.numpy(), expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(schedule.betas.double().numpy(), betas, rtol=1e-5, atol=1e-9)


def test_the_loss_noises_plans_by_eq4_with_s_t_given_and_drops_the_return_with_probability_p():
    """Through loss_fn, with a stub U-Net that records its inputs: x_k = sqrt(abar_k) x_0 + sqrt(1 - abar_k) eps (DDPM
    Eq. (4)) except at index 0, which holds the clean s_t (inpainting inside the loss); the returns reach the U-Net and
    `keep` drops them in about p of the plans (classifier-free guidance's condition dropout, DD Eq. (6))."""
    schedule, (batch, horizon, obs_dim) = dd.CosineSchedule(50), (4000, 6, 3)
    torch.manual_seed(0)
    states, actions = torch.rand(batch, horizon, obs_dim) * 2 - 1, torch.zeros(batch, horizon, 1)
    valid, returns = torch.ones(batch, horizon, dtype=torch.bool), torch.rand(batch, 1)
    seen = {}

    def unet(x_k, k, y, keep):
        seen.update(x_k=x_k.clone(), k=k, y=y, keep=keep)
        return torch.zeros_like(x_k)

    nets = SimpleNamespace(unet=unet, inverse_dynamics=lambda pairs: torch.zeros(*pairs.shape[:-1], 1))
    torch.manual_seed(1)
    dd.loss_fn(nets, schedule, states, actions, valid, returns, 0.25)
    torch.manual_seed(1)
    k, noise = torch.randint(0, 50, (batch,)), torch.randn(batch, horizon, obs_dim)  # drawn as loss_fn draws them
    abar = torch.as_tensor(independent_alphas_cumprod(50)[1][k.numpy()])[:, None, None]
    expected = abar.sqrt() * states.double() + (1 - abar).sqrt() * noise.double()
    assert torch.equal(seen["k"], k) and torch.equal(seen["y"], returns)
    torch.testing.assert_close(seen["x_k"][:, 1:].double(), expected[:, 1:], rtol=1e-5, atol=1e-6)
    assert torch.equal(seen["x_k"][:, 0], states[:, 0])  # s_t enters the noise model clean
    assert set(seen["keep"].tolist()) == {0.0, 1.0} and abs(seen["keep"].mean().item() - 0.75) < 0.03
    dd.loss_fn(nets, schedule, states, actions, valid, returns, 0.0)
    assert seen["keep"].min() == 1  # p = 0 keeps every return


def ddpm(epsilon_fn, schedule, state, horizon, temperature=0.5, initial_noise=None, generator=None):
    return dd.sample(epsilon_fn, schedule, state, horizon, range(schedule.n_steps), None, temperature, initial_noise,
                     generator)


def ddim(epsilon_fn, schedule, state, horizon, sampling_steps, eta=0.0, temperature=0.5, initial_noise=None):
    steps = dd.ddim_timesteps(schedule.n_steps, sampling_steps)
    return dd.sample(epsilon_fn, schedule, state, horizon, steps, eta, temperature, initial_noise)


def fixed_epsilon(x, k):
    """A deterministic stand-in for the network: depends on x and k."""
    return 0.4 * torch.tanh(x) + 0.01 * k.float()[:, None, None]


def test_ddpm_sampling_matches_an_independent_float64_loop():
    """Every DDPM step: x0 = clamp((x - sqrt(1 - abar) eps) / sqrt(abar)), mean from the posterior q(x_{k-1}|x_k, x0)
    written from betas alone, plus alpha sqrt(beta_tilde) z; index 0 inpainted."""
    n_steps, temperature = 20, 0.5
    schedule = dd.CosineSchedule(n_steps)
    betas, alphas_cumprod = independent_alphas_cumprod(n_steps)
    state, noise = torch.tensor([[0.3, -0.2, 0.9], [-0.5, 0.1, 0.0]]), torch.randn(2, 6, 3)
    generator = torch.Generator().manual_seed(7)
    ours = ddpm(fixed_epsilon, schedule, state, 6, temperature, noise, generator)
    generator = torch.Generator().manual_seed(7)
    x = (temperature * noise).double()
    x[:, 0] = state.double()
    for i in reversed(range(n_steps)):
        abar, abar_prev = alphas_cumprod[i], alphas_cumprod[i - 1] if i > 0 else 1.0
        k = torch.full((2,), i)
        x0 = ((x - np.sqrt(1 - abar) * fixed_epsilon(x.float(), k).double()) / np.sqrt(abar)).clamp(-1, 1)
        mean = ((np.sqrt(abar_prev) * betas[i] / (1 - abar)) * x0
                + (np.sqrt(1 - betas[i]) * (1 - abar_prev) / (1 - abar)) * x)
        if i > 0:
            variance = (1 - abar_prev) / (1 - abar) * betas[i]
            mean = mean + temperature * np.sqrt(variance) * torch.randn(2, 6, 3, generator=generator).double()
        x = mean
        x[:, 0] = state.double()
    torch.testing.assert_close(ours.double(), x, rtol=1e-4, atol=1e-4)


def test_ddim_with_all_steps_and_eta_one_follows_the_ddpm_mean_path():
    """Song et al.: DDIM with eta = 1 over every training step is DDPM. With the noise off (temperature 0), both
    follow the posterior-mean path from the same x_K, step for step."""
    schedule = dd.CosineSchedule(30)
    state, noise = torch.tensor([[0.2, 0.5, -0.4]]), torch.randn(1, 8, 3)
    ddpm_plan = ddpm(fixed_epsilon, schedule, state, 8, temperature=0.0, initial_noise=noise)
    ddim_plan = ddim(fixed_epsilon, schedule, state, 8, 30, eta=1.0, temperature=0.0, initial_noise=noise)
    torch.testing.assert_close(ddim_plan, ddpm_plan, rtol=1e-4, atol=1e-5)
    assert dd.ddim_timesteps(30, 30) == list(range(30))
    assert dd.ddim_timesteps(200, 10)[0] == 0 and dd.ddim_timesteps(200, 10)[-1] == 199


@pytest.mark.parametrize("steps", [40, 10, 3])
def test_deterministic_ddim_with_an_oracle_recovers_the_data_point(steps):
    """If eps_theta returns the exact noise of a fixed x0* (in [-1, 1]), deterministic DDIM lands on x0* for any
    number of steps (Eq. 12 with sigma = 0 keeps x_k on the line between x0* and that noise)."""
    schedule = dd.CosineSchedule(40)
    torch.manual_seed(1)
    target = torch.rand(2, 8, 3) * 1.6 - 0.8
    state = target[:, 0]

    def oracle(x, k):
        abar = schedule.alphas_cumprod[k][:, None, None]
        return (x - abar.sqrt() * target) / (1 - abar).sqrt()

    out = ddim(oracle, schedule, state, 8, sampling_steps=steps, eta=0.0, temperature=1.0)
    torch.testing.assert_close(out, target, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Guidance, inpainting, U-Net
# ----------------------------------------------------------------------------------------------------------------------
def test_batched_guidance_equals_two_separate_passes():
    torch.manual_seed(2)
    unet = dd.TemporalUnet(obs_dim=3, horizon=8, dim=16, dim_mults=(1, 2), kernel_size=5)
    x, k, returns = torch.randn(4, 8, 3), torch.tensor([0, 3, 7, 9]), torch.rand(4, 1)
    w = 1.7
    with torch.no_grad():
        eps_c = unet(x, k, returns, torch.ones(4))
        eps_u = unet(x, k, returns, torch.zeros(4))
        guided = dd.guided_epsilon(unet, x, k, returns, w)
        eps_u_again = unet(x, k, torch.rand(4, 1), torch.zeros(4))  # the null condition ignores the return
    torch.testing.assert_close(guided, eps_u + w * (eps_c - eps_u), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eps_u_again, eps_u)
    assert not torch.allclose(eps_c, eps_u)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_inpainted_state_stays_exactly_the_observation(sampler):
    torch.manual_seed(3)
    unet = dd.TemporalUnet(obs_dim=3, horizon=8, dim=16, dim_mults=(1, 2), kernel_size=5)
    schedule = dd.CosineSchedule(12)
    state, returns = torch.tensor([[0.123, -0.456, 0.789], [1.0, -1.0, 0.0]]), torch.rand(2, 1)
    seen = []

    def recording(x, k):
        seen.append(x.clone())  # the plan after the previous denoising step (or x_K)
        return dd.guided_epsilon(unet, x, k, returns, 1.2)

    if sampler == "ddpm":
        out = ddpm(recording, schedule, state, 8, temperature=0.5)
    else:
        out = ddim(recording, schedule, state, 8, sampling_steps=5, eta=0.5, temperature=0.5)
    assert len(seen) == (12 if sampler == "ddpm" else 5)
    for x in seen + [out]:
        assert torch.equal(x[:, 0], state)
    assert not torch.equal(out[:, 1], out[:, 2])  # the rest of the plan did change


@pytest.mark.parametrize("horizon, mults", [(4, (1, 2, 4)), (32, (1, 2, 4)), (100, (1, 4, 8)), (7, (1,)), (6, (1, 2))])
def test_unet_preserves_shape_for_valid_horizons(horizon, mults):
    unet = dd.TemporalUnet(obs_dim=5, horizon=horizon, dim=8, dim_mults=mults, kernel_size=5)
    out = unet(torch.randn(3, horizon, 5), torch.tensor([0, 1, 2]), torch.rand(3, 1), torch.ones(3))
    assert out.shape == (3, horizon, 5)


def test_unet_output_depends_on_the_diffusion_step():
    """The noise prediction eps_theta(x_k, k, y) is a function of k: the same x_k at two steps gives two outputs."""
    torch.manual_seed(0)
    unet = dd.TemporalUnet(obs_dim=5, horizon=8, dim=8, dim_mults=(1, 2), kernel_size=5)
    x, returns, keep = torch.randn(1, 8, 5).expand(2, -1, -1), torch.rand(1, 1).expand(2, -1), torch.ones(2)
    out = unet(x, torch.tensor([1, 7]), returns, keep)
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_a_horizon_the_unet_cannot_halve_is_rejected_with_one_line():
    with pytest.raises(SystemExit) as error:
        dd.validate_args(dd.Args(dataset="data.npz", horizon=30, dim_mults=(1, 2, 4)))
    message = str(error.value)
    assert "\n" not in message and "--horizon 30 must be divisible by 4" in message and "valid horizons" in message


def test_faithful_unet_has_about_60m_parameters():
    """Released config on Hopper (11 state dims): dim 128, dim_mults (1, 4, 8); ALGORITHMS.md says ~60M."""
    unet = dd.TemporalUnet(obs_dim=11, horizon=100, dim=128, dim_mults=(1, 4, 8), kernel_size=5)
    assert 50e6 < sum(p.numel() for p in unet.parameters()) < 70e6


# ----------------------------------------------------------------------------------------------------------------------
# Data: normalisers, returns, windows
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cdf", "limits"])
def test_normalizer_maps_to_unit_interval_and_inverts(kind):
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(size=5000), rng.exponential(size=5000), np.full(5000, 3.0),
                  rng.choice([-2.0, 2.0, 0.5], size=5000)], axis=1).astype(np.float32)
    norm = dd.Normalizer.fit(x, kind, 1001)
    y = norm.normalize(torch.as_tensor(x))
    assert y.min() >= -1 and y.max() <= 1
    assert torch.all(y[:, 2].abs() < 1e-6)  # a constant dimension maps to 0
    torch.testing.assert_close(norm.unnormalize(y), torch.as_tensor(x), rtol=1e-4, atol=1e-4)
    if kind == "cdf":  # roughly uniform on [-1, 1] for a continuous distribution
        assert abs(float(y[:, 0].mean())) < 0.02 and abs(float((y[:, 0] < 0).float().mean()) - 0.5) < 0.02
    else:
        assert y[:, 0].min() == -1 and y[:, 0].max() == 1


def test_discounted_returns_restart_at_episode_ends_with_termination_penalty():
    data = {"rewards": np.array([1, 1, 1, 2, 2], np.float32), "terminals": np.array([0, 0, 1, 0, 0], bool),
            "timeouts": np.array([0, 0, 0, 0, 1], bool)}
    returns = dd.discounted_returns(data, 0.5, -100.0)
    np.testing.assert_allclose(returns, [1 + 0.5 + 0.25 * -99, 1 + 0.5 * -99, -99, 2 + 0.5 * 2, 2])


def test_plans_pad_only_after_a_termination_and_never_run_past_a_truncation():
    """Episode 0 (rows 0..2) terminates, episode 1 (rows 3..7) is cut by a time limit. With H = 4 every row of episode
    0 starts a plan, padded with copies of its final state s_3; in episode 1 only rows 3, 4 and 5 do (their plans end
    by the real final state s_8): no plan shows a state frozen after a truncation."""
    obs = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    data = {"observations": obs, "next_observations": obs + 1, "actions": np.arange(8, dtype=np.float32)[:, None] / 10,
            "rewards": np.zeros(8, np.float32), "terminals": np.array([0, 0, 1, 0, 0, 0, 0, 0], bool),
            "timeouts": np.array([0, 0, 0, 0, 0, 0, 0, 1], bool), "scaled_returns": np.arange(8, dtype=np.float32)}
    identity = dd.Normalizer(torch.tensor([[-1.0, 1.0]] * 2) * 10)  # x -> x / 10
    windows = dd.PlanWindows(data, identity, dd.Normalizer(torch.tensor([[-1.0, 1.0]])), 4, torch.device("cpu"))
    index = windows.starts[:, None] + windows.offsets  # every plan the sampler can draw, (W, H)
    plans = (windows.states[index][..., 0] * 10).round().long().tolist()
    assert plans == [[0, 1, 2, 3], [1, 2, 3, 3], [2, 3, 3, 3], [3, 4, 5, 6], [4, 5, 6, 7], [5, 6, 7, 8]]
    assert windows.returns.tolist() == [0, 1, 2, 3, 4, 5]  # each plan's y(tau) is that of its first row
    assert windows.valid[index][1].tolist() == [True, True, False, False]  # padded actions are masked
    assert windows.valid[index][5].tolist() == [True, True, True, False]  # s_8 takes no action
    torch.manual_seed(0)
    returns = windows.sample(300)[3]
    assert set(returns[:, 0].tolist()) == {0, 1, 2, 3, 4, 5}  # uniform over these plans: rows 6 and 7 never
    with pytest.raises(SystemExit, match="lower --horizon"):  # truncated episodes shorter than a plan give none
        dd.PlanWindows({**data, "terminals": np.zeros(8, bool)}, identity, identity, 10, torch.device("cpu"))


def test_returns_scale_is_d4rl_s_only_for_a_d4rl_file_under_its_own_name():
    """A released per-dataset scale only for a D4RL .hdf5 file named as D4RL names it, or with --returns-scale; every
    .npz and Minari id uses the data's own range, whatever its name (halfcheetah_sac_medium_100k.npz got D4RL's 580)."""
    data = {"returns": np.array([-5.0, 15.0], np.float32)}

    def scaling(dataset, **overrides):
        return dd.returns_scaling(data, dd.Args(dataset=dataset, **overrides))[:2]

    assert scaling("hopper-medium-expert-v2.hdf5") == (0.0, 400.0)
    assert scaling("data/hopper_medium_expert-v2.hdf5") == (0.0, 400.0)  # D4RL's own download name
    assert scaling("d4rl/halfcheetah-medium-v2.hdf5") == (0.0, 580.0)  # "medium" is not "medium-expert"'s 1200
    for name in ["halfcheetah_sac_medium_100k.npz", "data/hopper-medium-expert-v2.npz", "mujoco/hopper/medium-v0",
                 "mujoco/halfcheetah/medium-v0", "data/walker2d_medium_replay.hdf5", "my_hopper-medium-v2.hdf5",
                 "data/pendulum.npz"]:
        assert scaling(name) == (-5.0, 20.0), name  # the data's own range mapped to [0, 1]
    assert scaling("hopper-medium-expert-v2.hdf5", returns_scale=123.0) == (0.0, 123.0)
    assert scaling("halfcheetah_sac_medium_100k.npz", returns_scale=123.0) == (0.0, 123.0)


# ----------------------------------------------------------------------------------------------------------------------
# Losses, EMA, evaluation with early terminations
# ----------------------------------------------------------------------------------------------------------------------
def test_loss_fn_weights_index_zero_and_masks_padded_actions():
    """Hand-built windows (row 0: two real actions then padding; row 1: all real), a fixed noise prediction and a
    fixed inverse dynamics function: the diffusion loss ignores index 0, the inverse dynamics loss ignores padded
    actions, and the total is 1/2 (diffusion + inverse dynamics)."""
    torch.manual_seed(5)
    schedule, (batch, horizon, obs_dim) = dd.CosineSchedule(10), (2, 4, 3)
    states, actions = torch.rand(batch, horizon, obs_dim) * 2 - 1, torch.rand(batch, horizon, 1) * 2 - 1
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    returns, prediction = torch.rand(batch, 1), torch.randn(batch, horizon, obs_dim)

    def inverse_dynamics(pairs):  # (B, H-1, 2 obs_dim) -> (B, H-1, 1)
        return pairs.sum(-1, keepdim=True) / 10

    def losses(prediction=prediction, actions=actions):
        nets = SimpleNamespace(unet=lambda x, k, y, keep: prediction, inverse_dynamics=inverse_dynamics)
        torch.manual_seed(0)  # the same k and noise every call
        return dd.loss_fn(nets, schedule, states, actions, valid, returns, 0.25)

    total, diffusion, inverse = losses()
    torch.manual_seed(0)
    torch.randint(0, 10, (batch,))  # k, drawn first by loss_fn
    noise = torch.randn(batch, horizon, obs_dim)
    torch.testing.assert_close(diffusion, ((prediction - noise)[:, 1:] ** 2).sum() / prediction.numel())
    real = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]  # (row, t) of real pairs (s_t, s_t+1) with action a_t
    errors = [(inverse_dynamics(torch.cat([states[b, t], states[b, t + 1]]))[0] - actions[b, t, 0]) ** 2
              for b, t in real]
    torch.testing.assert_close(inverse, torch.stack(errors).mean())
    torch.testing.assert_close(total, 0.5 * (diffusion + inverse))
    changed = prediction.clone()
    changed[:, 0] += 5.0
    assert torch.equal(losses(prediction=changed)[1], diffusion)  # index 0 has weight 0
    changed[:, 1] += 5.0
    assert not torch.equal(losses(prediction=changed)[1], diffusion)
    padded = actions.clone()
    padded[0, 2:] += 5.0
    padded[1, 3] += 5.0  # the last index starts no pair
    assert torch.equal(losses(actions=padded)[2], inverse)
    padded[0, 1] += 5.0
    assert not torch.equal(losses(actions=padded)[2], inverse)


def asymmetric_inverse_dynamics(pairs):
    """f(s, s') = s' - 2 s per dimension (act_dim = obs_dim): swapping s_t and s_t+1 changes every value."""
    obs_dim = pairs.shape[-1] // 2
    return pairs[..., obs_dim:] - 2 * pairs[..., :obs_dim]


def test_the_inverse_dynamics_loss_feeds_s_t_then_s_t_plus_1():
    """DD Eq. (4)/(6): the inverse dynamics model is trained on a_t = f(s_t, s_t+1), in that order."""
    torch.manual_seed(6)
    states, actions = torch.rand(2, 4, 3) * 2 - 1, torch.rand(2, 4, 3) * 2 - 1
    nets = SimpleNamespace(unet=lambda x_k, *_: torch.zeros_like(x_k), inverse_dynamics=asymmetric_inverse_dynamics)
    _, _, inv_loss = dd.loss_fn(nets, dd.CosineSchedule(10), states, actions, torch.ones(2, 4, dtype=torch.bool),
                                torch.rand(2, 1), 0.0)
    expected = ((states[:, 1:] - 2 * states[:, :-1] - actions[:, :-1]) ** 2).mean()
    torch.testing.assert_close(inv_loss, expected)


def test_evaluation_acts_with_f_of_s_t_then_the_planned_s_t_plus_1(monkeypatch):
    """DD Algorithm 1: a_t = f(s_t, s_t+1) with s_t+1 from the plan, in that order. A plan whose next state lies one
    unit above the current one, and f(s, s') = s' - 2 s: in order the first action dimension is 1 - s (positive for
    InvertedPendulum's small states), swapped it is -1 - ... (negative)."""
    state_norm, action_norm = dd.Normalizer(torch.tensor([[-1.0, 1.0]] * 4)), dd.Normalizer(torch.tensor([[-3.0, 3.0]]))
    sent = []

    def stub_sample(epsilon_fn, schedule, state, *unused, **unused_too):
        return torch.stack([state, state + 1.0], dim=1)  # (E, 2, obs_dim): s_t and a planned s_t+1

    def inverse_dynamics(pair):  # one action dimension: the first of s' - 2 s
        return asymmetric_inverse_dynamics(pair)[:, :1] / 3

    args, nets = dd.Args(seed=3, eval_episodes=2, cuda=False), SimpleNamespace(inverse_dynamics=inverse_dynamics)
    monkeypatch.setattr(dd, "sample", stub_sample)
    envs = gym.vector.SyncVectorEnv([lambda i=i: dd.make_env("InvertedPendulum-v5", i, 4, 1, "test") for i in range(2)])
    real_step = envs.step
    monkeypatch.setattr(envs, "step", lambda actions: (sent.append(np.array(actions)), real_step(actions))[1])
    dd.evaluate(nets, dd.CosineSchedule(10), state_norm, action_norm, envs, args, 0.9, torch.device("cpu"))
    envs.close()
    assert len(sent) > 1 and all((actions > 0).all() for actions in sent[:2]), sent[:2]


def test_train_step_ema_is_a_copy_before_ema_start_then_an_exponential_average():
    """train_step's EMA: a plain copy of the just-updated weights at every ema_every-th step before ema_start, nothing
    in between, then theta_ema <- d theta_ema + (1 - d) theta."""
    args = dd.Args(ema_every=5, ema_start=10, ema_decay=0.9, batch_size=2, gradient_accumulate_every=1)
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    windows = SimpleNamespace(sample=lambda batch: (None, None, None, None))

    def loss(nets, *unused):  # any loss that moves every weight
        value = (nets.weight ** 2).sum() + nets.bias.sum()
        return value, value.detach(), value.detach()

    def step(n):
        dd.train_step(model, ema, None, optimizer, windows, n, args, compute_loss=loss)

    step(5)
    assert all(torch.equal(p, q) for p, q in zip(ema.parameters(), model.parameters()))  # an exact copy
    previous = [p.clone() for p in ema.parameters()]
    step(9)  # not a multiple of ema_every: unchanged, while the model moved
    assert all(torch.equal(p, old) for p, old in zip(ema.parameters(), previous))
    assert not any(torch.equal(p, q) for p, q in zip(ema.parameters(), model.parameters()))
    step(10)  # theta_ema <- d theta_ema + (1 - d) theta, with theta after this step's update
    for p, old, q in zip(ema.parameters(), previous, model.parameters()):
        torch.testing.assert_close(p, 0.9 * old + 0.1 * q, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(p, q)


def test_evaluation_ignores_envs_that_finished(monkeypatch):
    """InvertedPendulum-v5 ends when the pole falls, at a different step in each env. With a stub plan (the current
    state twice) and a stub inverse dynamics (push the way the pole leans), each env's return in the batched
    evaluation must equal a single-env replay from the same seed: finished envs' steps are not counted."""
    state_norm = dd.Normalizer(torch.tensor([[-100.0, 100.0]] * 4))  # x -> x / 100
    action_norm = dd.Normalizer(torch.tensor([[-3.0, 3.0]]))  # y -> 3 y

    def inverse_dynamics(pair):  # (E, 2 obs_dim) normalised -> (E, 1) normalised action, elementwise in the batch
        return torch.tanh(2000.0 * pair[:, 1:2]) / 3

    def stub_sample(epsilon_fn, schedule, state, *unused, **unused_too):
        return torch.stack([state, state], dim=1)  # (E, 2, obs_dim)

    args, nets = dd.Args(seed=3, eval_episodes=4, cuda=False), SimpleNamespace(inverse_dynamics=inverse_dynamics)
    monkeypatch.setattr(dd, "sample", stub_sample)
    envs = gym.vector.SyncVectorEnv([lambda i=i: dd.make_env("InvertedPendulum-v5", i, 4, 1, "test") for i in range(4)])
    returns, _ = dd.evaluate(nets, dd.CosineSchedule(10), state_norm, action_norm, envs, args, 0.9, torch.device("cpu"))
    envs.close()
    replayed = []
    for i in range(4):
        env, total, done = gym.make("InvertedPendulum-v5"), 0.0, False
        obs, _ = env.reset(seed=args.seed + 10_000 + i)
        while not done:
            state = state_norm.normalize(torch.as_tensor(obs[None], dtype=torch.float32))
            action = action_norm.unnormalize(inverse_dynamics(torch.cat([state, state], -1))).numpy()[0]
            obs, reward, terminated, truncated, _ = env.step(np.clip(action, -3.0, 3.0))
            total, done = total + reward, terminated or truncated
        replayed.append(total)
    assert len(set(replayed)) > 1 and max(replayed) < 1000, replayed  # episodes ended early, at different steps
    np.testing.assert_array_equal(returns, replayed)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DD_COMPILE_TESTS"), reason="torch.compile takes minutes on a small CPU; "
                    "set DD_COMPILE_TESTS=1")
def test_compile_smoke_run(in_tmp, small_dataset):
    returns = dd.main(tiny_args(small_dataset, compile=True, total_steps=3, log_every=1, eval_episodes=1))
    assert np.all(np.isfinite(returns))


# ----------------------------------------------------------------------------------------------------------------------
# Command line, checkpoints, determinism
# ----------------------------------------------------------------------------------------------------------------------
def test_cli_run_logs_finite_metrics(tmp_path, small_dataset):
    result = run_script(SCRIPT, "--dataset", str(small_dataset), *TINY, "--total-steps", "40", "--log-every", "10",
                        "--eval-every", "20", cwd=str(tmp_path))
    scalars = read_scalars(only_run_dir(str(tmp_path)))
    for tag in ["losses/loss", "losses/diffusion_loss", "losses/inv_loss", "charts/SPS", "eval/episodic_return",
                "eval/ms_per_plan"]:
        assert tag in scalars, f"{tag} missing; logged: {sorted(scalars)}"
        assert all_finite(v for _, v in scalars[tag]), tag
    assert [step for step, _ in scalars["losses/loss"]] == [10, 20, 30, 40]
    assert [step for step, _ in scalars["eval/episodic_return"]] == [20, 40]
    assert "eval/normalized_score" not in scalars  # Pendulum has no reference scores
    losses = [v for _, v in scalars["losses/diffusion_loss"]]
    assert losses[-1] < losses[0]  # it is learning something
    assert len(evaluation_returns(result.stdout)) == 2 and "final evaluation:" in result.stdout
    assert "step 40/40 |" in result.stdout and "SPS | ETA" in result.stdout
    assert "returns: the data's own range" in result.stdout.splitlines()[0]  # the run's first line says which scale


def test_checkpoint_round_trip_and_determinism(in_tmp, small_dataset):
    returns = dd.main(tiny_args(small_dataset, save_model=True))
    again = dd.main(tiny_args(small_dataset))
    np.testing.assert_array_equal(returns, again)  # same seed on CPU, same numbers
    assert not np.array_equal(returns, dd.main(tiny_args(small_dataset, seed=4)))
    path = glob.glob("runs/*/decision_diffuser.pt")
    assert len(path) == 1 and not glob.glob("runs/*/*.tmp*")
    state = torch.load(path[0], weights_only=True)
    assert state["global_step"] == 30 and state["env_id"] == "Pendulum-v1" and state["obs_dim"] == 3
    assert {"model", "ema_model", "optimizer", "state_knots", "action_knots", "returns_scale"} <= set(state)
    assert state["state_knots"].shape == (3, 101)
    ema, online = state["ema_model"], state["model"]
    assert not torch.equal(ema["unet.final.1.weight"], online["unet.final.1.weight"])  # EMA after step 10
    # Evaluation-only mode rebuilds everything from the checkpoint (no dataset) and reproduces the final evaluation:
    # the same start states and sampling noise, from the checkpoint's own seed (3; --seed's default is 1) ...
    evaluation = dict(eval_checkpoint=path[0], eval_episodes=2, sampler="ddim", sampling_steps=4, cuda=False)
    np.testing.assert_array_equal(dd.main(dd.Args(**evaluation)), returns)
    # ... unless --eval-seed asks for other episodes (here those of the seed-4 run's evaluations' start states).
    assert not np.array_equal(dd.main(dd.Args(**evaluation, eval_seed=4)), returns)


def test_cli_eval_checkpoint_with_another_sampler(tmp_path, small_dataset):
    run_script(SCRIPT, "--dataset", str(small_dataset), *TINY, "--total-steps", "10", "--save-model",
               cwd=str(tmp_path))
    checkpoint = glob.glob(str(tmp_path / "runs" / "*" / "decision_diffuser.pt"))[0]
    result = run_script(SCRIPT, "--eval-checkpoint", checkpoint, "--sampler", "ddpm", "--eval-episodes", "2",
                        "--no-cuda", cwd=str(tmp_path))
    assert "DDPM 10 steps" in result.stdout and "final evaluation:" in result.stdout


def test_capture_video_records_the_final_evaluation_without_changing_returns(inverted_pendulum_random_npz, in_tmp):
    """--capture-video records every episode of the final evaluation; the evaluation-only mode of the run's
    checkpoint (no video) gives the very same returns, and records too when asked."""
    pytest.importorskip("moviepy")
    recorded = run_script(SCRIPT, "--dataset", inverted_pendulum_random_npz, *TINY, "--total-steps", "10",
                          "--eval-every", "5", "--save-model", "--capture-video", cwd=str(in_tmp), check=False,
                          env={"MUJOCO_GL": "egl"})
    if recorded.returncode != 0 and "cannot render" in recorded.stderr:
        pytest.skip(f"no rendering backend here: {recorded.stderr.strip()}")
    assert recorded.returncode == 0, recorded.stderr
    run_dir = only_run_dir(str(in_tmp))
    videos = os.path.join("videos", os.path.basename(run_dir))
    assert sorted(os.listdir(videos)) == ["eval-0-episode-0.mp4", "eval-1-episode-0.mp4"]  # not the step-5 one
    checkpoint = os.path.join(run_dir, "decision_diffuser.pt")
    same = ["--eval-checkpoint", checkpoint, "--no-cuda", "--eval-episodes", "2", "--sampler", "ddim",
            "--sampling-steps", "4"]  # the run's own sampling flags (they are not taken from the checkpoint)
    plain = run_script(SCRIPT, *same, cwd=str(in_tmp))
    again = run_script(SCRIPT, *same, "--capture-video", "--exp-name", "again", cwd=str(in_tmp),
                       env={"MUJOCO_GL": "egl"})
    final = [line for line in recorded.stdout.splitlines() if line.startswith("final evaluation")]
    for result in (plain, again):
        assert [line for line in result.stdout.splitlines() if line.startswith("final evaluation")] == final
    assert len(glob.glob("videos/InvertedPendulum-v5__again__*/eval-*-episode-0.mp4")) == 2


def test_capture_video_errors_are_one_line(in_tmp, small_dataset, monkeypatch):
    """Without moviepy, or with a MUJOCO_GL backend that does not exist: a one-line error naming the fix."""
    monkeypatch.setitem(sys.modules, "moviepy", None)  # as if moviepy were not installed
    with pytest.raises(SystemExit, match="--capture-video needs moviepy: pip install moviepy"):
        dd.main(tiny_args(small_dataset, capture_video=True))
    result = run_script(SCRIPT, "--dataset", str(small_dataset), "--env-id", "Hopper-v5", cwd=str(in_tmp),
                        check=False, env={"MUJOCO_GL": "no-such-backend"})
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "MUJOCO_GL" in result.stderr


@pytest.mark.parametrize("env_id_as", ["attribute", "dataset"])
def test_hdf5_and_npz_give_the_same_arrays(tmp_path, small_dataset, env_id_as):
    h5py = pytest.importorskip("h5py")
    with np.load(small_dataset) as file, h5py.File(tmp_path / "d.hdf5", "w") as out:
        for key in dd.KEYS:
            out[key] = file[key].astype(np.float64) if file[key].dtype == np.float32 else file[key]
        if env_id_as == "attribute":
            out.attrs["env_id"] = "Pendulum-v1"
        else:
            out["env_id"] = "Pendulum-v1"  # h5py 3 reads a string dataset back as bytes
    a, b = dd.load_dataset(str(small_dataset), False), dd.load_dataset(str(tmp_path / "d.hdf5"), False)
    for key in dd.KEYS:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["env_id"] == "Pendulum-v1" and b["env_id"] == "Pendulum-v1"


def minari_buffers(minari, data) -> list:
    """The episodes of `data` as Minari episode buffers (N + 1 observations each)."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    buffers = []
    for i, (begin, end) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
        obs = np.concatenate([data["observations"][begin:end], data["next_observations"][end - 1 : end]])
        buffers.append(minari.data_collector.EpisodeBuffer(
            id=i, observations=obs, actions=data["actions"][begin:end], rewards=data["rewards"][begin:end],
            terminations=data["terminals"][begin:end], truncations=data["timeouts"][begin:end], infos={}))
    return buffers


def test_minari_dataset_reads_like_the_npz(tmp_path, small_dataset, monkeypatch):
    minari = pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    data = dd.load_dataset(str(small_dataset), False)
    minari.create_dataset_from_buffers("test/pendulum/small-v0", minari_buffers(minari, data),
                                       env=gym.make("Pendulum-v1"),
                                       algorithm_name="swing-up", author="tests", author_email="t@example.com",
                                       code_permalink="https://example.com")
    loaded = dd.load_dataset("test/pendulum/small-v0", False)
    for key in dd.KEYS:
        np.testing.assert_allclose(loaded[key], data[key], rtol=1e-6)
    assert loaded["env_id"] == "Pendulum-v1"
    with pytest.raises(SystemExit, match="--download-dataset"):
        dd.load_dataset("test/pendulum/missing-v0", False)


def test_a_minari_dataset_exported_by_sac_reads_like_its_npz(sac_minari_export, monkeypatch):
    """The Minari route of docs/datasets.md: sac_continuous.py --export-minari ID, then --dataset ID."""
    folder, root = sac_minari_export
    monkeypatch.setenv("MINARI_DATASETS_PATH", root)
    from_npz = dd.load_dataset(str(folder / "replay.npz"), False)
    from_minari = dd.load_dataset("local/hopper-test-replay-v0", False)
    for key in dd.KEYS:
        assert from_minari[key].dtype == from_npz[key].dtype, key
        np.testing.assert_array_equal(from_minari[key], from_npz[key], err_msg=key)
    assert from_minari["env_id"] == "Hopper-v5" and from_minari["ref_scores"][:2] == from_npz["ref_scores"][:2]


def test_atomic_write_flushes_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(dd.os, "fsync", lambda fd: events.append("fsync"))
    replace = dd.os.replace
    monkeypatch.setattr(dd.os, "replace", lambda *paths: (events.append("replace"), replace(*paths)))
    dd.atomic_write(str(tmp_path / "x.pt"), lambda file: file.write(b"data"))
    assert events == ["fsync", "replace"] and (tmp_path / "x.pt").read_bytes() == b"data"


def test_evaluation_plans_with_the_ema_weights(in_tmp, small_dataset, monkeypatch):
    """After ema_start the EMA and online weights differ; every plan of the run's evaluation must come from the EMA
    copy that the checkpoint stores as ema_model, none from the online model."""
    seen, guided_epsilon = [], dd.guided_epsilon

    def recording(unet, x_k, k, returns, weight):  # the noise model that plans, at every denoising step
        seen.append({name: value.clone() for name, value in unet.state_dict().items()})
        return guided_epsilon(unet, x_k, k, returns, weight)

    monkeypatch.setattr(dd, "guided_epsilon", recording)
    dd.main(tiny_args(small_dataset, save_model=True, eval_episodes=1))
    state = torch.load(glob.glob("runs/*/decision_diffuser.pt")[0], weights_only=True)
    ema = {name.removeprefix("unet."): value for name, value in state["ema_model"].items() if name.startswith("unet.")}
    online = {name.removeprefix("unet."): value for name, value in state["model"].items() if name.startswith("unet.")}
    assert not torch.equal(ema["final.1.weight"], online["final.1.weight"])
    assert seen and all(all(torch.equal(weights[name], ema[name]) for name in ema) for weights in seen)


def test_cli_track_sends_the_metrics_to_weights_and_biases(tmp_path, small_dataset):
    """wandb's offline mode is a real client without network: the run file it writes must hold the losses, the
    speed and the evaluation that TensorBoard got (sync_tensorboard only sees writers created after wandb.init)."""
    pytest.importorskip("wandb")
    run_script(SCRIPT, "--dataset", str(small_dataset), *TINY, "--total-steps", "20", "--log-every", "10",
               "--eval-every", "10", "--track", cwd=str(tmp_path),
               env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    tags = wandb_offline_tags(str(tmp_path))
    for tag in ["losses/loss", "losses/diffusion_loss", "losses/inv_loss", "charts/SPS", "eval/episodic_return"]:
        assert tag in tags, (tag, sorted(tags))


def test_speed_is_that_of_the_last_interval_without_evaluations(in_tmp, small_dataset, monkeypatch):
    """A fake clock: each training step takes 0.01 s, each evaluation 100 s. Every logged SPS must be 100 (an average
    since the start would fall to about 2 after the first evaluation, and the ETA would include evaluations)."""
    clock = [0.0]
    monkeypatch.setattr(dd.time, "perf_counter", lambda: clock[0])
    train_step, evaluate = dd.train_step, dd.evaluate

    def slow_train_step(*args, **kwargs):
        clock[0] += 0.01
        return train_step(*args, **kwargs)

    def slow_evaluate(*args, **kwargs):
        clock[0] += 100.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(dd, "train_step", slow_train_step)
    monkeypatch.setattr(dd, "evaluate", slow_evaluate)
    dd.main(tiny_args(small_dataset, total_steps=40, log_every=10, eval_every=10, eval_episodes=1))
    sps = [value for _, value in read_scalars(only_run_dir("."))["charts/SPS"]]
    assert len(sps) == 4 and all(value == pytest.approx(100.0) for value in sps), sps


def test_download_without_the_hf_extra_names_the_install_command(monkeypatch):
    """minari 0.5.4 downloads through huggingface_hub and, without its "hf" extra, raises ImportError (its own message,
    or a bare ModuleNotFoundError where the import is not wrapped): the error must name pip install "minari[hf]"."""
    minari = pytest.importorskip("minari")
    for error in [ImportError('huggingface_hub is not installed. Please install it using `pip install "minari[hf]"`'),
                  ModuleNotFoundError("No module named 'huggingface_hub'", name="huggingface_hub")]:
        def load_dataset(dataset_id, download=False, error=error):
            raise error

        monkeypatch.setattr(minari, "load_dataset", load_dataset)
        with pytest.raises(SystemExit) as failure:
            dd.load_dataset("mujoco/hopper/medium-v0", True)
        message = str(failure.value)
        assert "\n" not in message and 'pip install "minari[hf]"' in message and "--download-dataset" in message


def test_minari_evaluation_env_is_the_one_its_metadata_records(tmp_path, small_dataset, monkeypatch):
    """A Minari dataset whose recorded evaluation env has a 50-step time limit (the data's env has 200): training
    evaluates in 50-step episodes, and so does evaluation-only mode from the run's checkpoint."""
    minari = pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.chdir(tmp_path)
    buffers = minari_buffers(minari, dd.load_dataset(str(small_dataset), False))
    minari.create_dataset_from_buffers("test/pendulum/short-eval-v0", buffers, env=gym.make("Pendulum-v1"),
                                       eval_env=gym.make("Pendulum-v1", max_episode_steps=50).spec,
                                       algorithm_name="swing-up", author="tests", author_email="t@example.com",
                                       code_permalink="https://example.com")
    lengths, evaluate = [], dd.evaluate

    def recording(nets, schedule, state_norm, action_norm, envs, *args, **kwargs):
        lengths.append(envs.envs[0].spec.max_episode_steps)
        return evaluate(nets, schedule, state_norm, action_norm, envs, *args, **kwargs)

    monkeypatch.setattr(dd, "evaluate", recording)
    dd.main(tiny_args("test/pendulum/short-eval-v0", total_steps=2, eval_episodes=1, save_model=True))
    dd.main(dd.Args(eval_checkpoint=glob.glob("runs/*/decision_diffuser.pt")[0], eval_episodes=1, cuda=False))
    assert lengths == [50, 50]


# ----------------------------------------------------------------------------------------------------------------------
# Learning: better than the data it learned from
# ----------------------------------------------------------------------------------------------------------------------
# The small configuration of the README and the script's docstring.
SMALL_CONFIG = ["--horizon", "16", "--dim", "32", "--dim-mults", "1", "2", "--n-diffusion-steps", "20",
                "--total-steps", "2000", "--batch-size", "64", "--gradient-accumulate-every", "1", "--ema-start", "500",
                "--learning-rate", "1e-3", "--normalizer", "limits", "--sampler", "ddim", "--sampling-steps", "10",
                "--no-cuda"]


def pendulum_learning_run(folder):
    """The small configuration trained on `pendulum_dataset`, then its checkpoint conditioned on a low return."""
    episode_returns = pendulum_dataset(os.path.join(folder, "pendulum.npz"))
    result = run_script(SCRIPT, "--dataset", "pendulum.npz", *SMALL_CONFIG, "--eval-every", "10000", "--log-every",
                        "500", "--save-model", cwd=folder)
    checkpoint = glob.glob(os.path.join(folder, "runs", "*", "decision_diffuser.pt"))[0]
    low = run_script(SCRIPT, "--eval-checkpoint", checkpoint, "--test-return", "0.1", "--sampler", "ddim",
                     "--sampling-steps", "10", "--no-cuda", cwd=folder)
    return episode_returns, result, low


@pytest.mark.learning
@pytest.mark.background(job=pendulum_learning_run)
def test_learns_pendulum_above_the_dataset_mean():
    """30 episodes: 10 of a swing-up controller (about -130), 10 with half the actions random (about -400) and 10
    random (about -1170); dataset mean about -630. Conditioned on a high return (0.9 of the data's range), the small
    configuration must score above -300 over 10 evaluation episodes, far above the data's mean. The same checkpoint
    conditioned on a low return (0.1) must score below -700: the return condition, not luck, sets the behaviour."""
    episode_returns, result, low = background(pendulum_learning_run)
    final = evaluation_returns(result.stdout)[-1]
    low_return = float(low.stdout.split("final evaluation: ")[1].split(" +-")[0])
    print(f"dataset mean {episode_returns.mean():.1f}, decision diffuser {final:.1f}, asked for a low return "
          f"{low_return:.1f}")
    assert episode_returns.mean() < -500
    assert final > -300, result.stdout
    assert low_return < -700, low.stdout


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the fix, never a traceback
# ----------------------------------------------------------------------------------------------------------------------
def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("decision_diffuser.py: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_errors_are_one_line(tmp_path, small_dataset):
    assert_one_line_error(run_script(SCRIPT, "--dataset", "data/missing.npz", "--no-cuda", cwd=str(tmp_path),
                                     check=False),
                          "data/missing.npz not found", "--export-replay", "mujoco/hopper/medium-v0")
    assert_one_line_error(run_script(SCRIPT, "--dataset", str(small_dataset), "--horizon", "30", "--no-cuda",
                                     cwd=str(tmp_path), check=False), "--horizon 30", "valid horizons")


def write_npz(path, drop=(), **changes):
    with np.load(changes.pop("source")) as file:
        data = {key: file[key] for key in file.files if key not in drop}
    data.update(changes)
    np.savez(path, **data)


def test_bad_input_fails_with_one_line(in_tmp, small_dataset):
    (in_tmp / "corrupt.npz").write_bytes(b"not a zip file")
    write_npz(in_tmp / "nokeys.npz", drop=("rewards", "timeouts"), source=small_dataset)
    write_npz(in_tmp / "noenv.npz", drop=("env_id",), source=small_dataset)
    torch.save({"script": "sac_continuous", "version": 1}, in_tmp / "sac.pt")
    (in_tmp / "corrupt.pt").write_bytes(b"not a checkpoint")
    torch.save({"script": "decision_diffuser", "version": dd.CHECKPOINT_VERSION, "args": {}}, in_tmp / "partial.pt")
    if "NoTimeLimitPendulum-v0" not in gym.registry:  # an env that never truncates
        gym.register("NoTimeLimitPendulum-v0", entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv")
    cases = [
        (tiny_args("corrupt.npz"), "corrupt"),
        (tiny_args("nokeys.npz"), "lacks the keys ['rewards', 'timeouts']"),
        (tiny_args("noenv.npz"), "pass --env-id"),
        (tiny_args(small_dataset, env_id="Hopper-v5"), "has obs_dim 3 / act_dim 1 but Hopper-v5"),
        (tiny_args(small_dataset, env_id="CartPole-v1"), "Box"),
        (tiny_args(small_dataset, env_id="NoSuchEnv-v0"), "--env-id"),
        (tiny_args(None), "--dataset is required"),
        (tiny_args(small_dataset, horizon=10, dim_mults=(1, 2, 4)), "valid horizons are 4, 8, 12"),
        (tiny_args(small_dataset, dim=12), "--dim must be a multiple of 8"),
        (tiny_args(small_dataset, sampling_steps=11), "--sampling-steps (11) cannot exceed"),
        (tiny_args(small_dataset, sampling_steps=1), "--sampling-steps must be >= 2"),
        (tiny_args(small_dataset, env_id="NoTimeLimitPendulum-v0"), "has no time limit"),
        (tiny_args(small_dataset, condition_dropout=1.0), "--condition-dropout"),
        (tiny_args(small_dataset, batch_size=0), "--batch-size must be > 0"),
        (tiny_args(small_dataset, seed=-1), "--seed"),
        (dd.Args(eval_checkpoint="missing.pt"), "does not exist"),
        (dd.Args(eval_checkpoint="sac.pt"), "written by sac_continuous, not decision_diffuser.py"),
        (dd.Args(eval_checkpoint="corrupt.pt"), "corrupt"),
        (dd.Args(eval_checkpoint="partial.pt"), "lacks the fields ['model', 'ema_model', 'state_knots'"),
        (tiny_args("no/such/minari-v0"), "--download-dataset"),
    ]
    for args, fragment in cases:
        with pytest.raises(SystemExit) as error:
            dd.main(args)
        message = str(error.value)
        assert "\n" not in message and fragment in message, (fragment, message)
        assert message.startswith("decision_diffuser.py: error:")


# ----------------------------------------------------------------------------------------------------------------------
# Exact resume: a run stopped at any moment after a checkpoint and resumed ends as if it had never stopped
# ----------------------------------------------------------------------------------------------------------------------
RESUMED = ("model", "ema_model", "optimizer", "random_state", "state_knots", "action_knots", "global_step")
WALL_CLOCK_TAGS = {"charts/SPS", "eval/ms_per_plan"}


def training_scalars(run_dir: str) -> dict:
    return {tag: values for tag, values in read_scalars(run_dir).items() if tag not in WALL_CLOCK_TAGS}


def evaluations_after(stdout: str, step: int) -> list[str]:
    """The returns printed by the evaluations after `step` ("eval at step N: RETURNS [sampler, ms]"), and the final."""
    return [line.split(" [")[0] for line in stdout.splitlines() if line.startswith("final evaluation")
            or line.startswith("eval at step") and int(line.split()[3].rstrip(":")) > step]


def test_a_run_killed_after_a_checkpoint_and_resumed_ends_as_the_uninterrupted_run(tmp_path,
                                                                                   inverted_pendulum_random_npz):
    """SIGKILL after a checkpoint and events past it, then `--resume CHECKPOINT` alone: the same evaluations
    after the checkpoint, the same final weights, EMA weights, Adam state and generators, the same TensorBoard scalars
    (the killed run's events up to its checkpoint kept, later ones dropped) but the wall-clock ones. InvertedPendulum:
    the tiny model drops the pole within a few steps, so evaluations are quick."""
    cli = ["--dataset", inverted_pendulum_random_npz, *TINY, "--total-steps", "60", "--eval-every", "30",
           "--log-every", "10", "--save-model"]
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    full = run_script(SCRIPT, *cli, cwd=str(tmp_path / "full"))
    checkpoint = run_killed_after_checkpoint(SCRIPT, *cli, "--checkpoint-every", "15", cwd=str(tmp_path / "killed"),
                                             checkpoint_name="decision_diffuser.pt")
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 15 <= step < 60
    resumed = run_script(SCRIPT, "--resume", checkpoint, cwd=str(tmp_path / "killed"))
    assert not resumed.stderr, resumed.stderr  # not even a warning from the command line's second parse
    assert evaluations_after(resumed.stdout, step) == evaluations_after(full.stdout, step)
    progress = [line for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert progress[0].startswith(f"step {(step // 10 + 1) * 10}/60 ")  # continues after the checkpoint
    ends = [torch.load(os.path.join(only_run_dir(str(tmp_path / name)), "decision_diffuser.pt"), weights_only=True)
            for name in ("full", "killed")]
    assert_same_tensors(*({key: end[key] for key in RESUMED} for end in ends))
    assert training_scalars(only_run_dir(str(tmp_path / "killed"))) == training_scalars(
        only_run_dir(str(tmp_path / "full")))


def test_resuming_from_an_earlier_checkpoint_drops_the_later_events_and_repeats_the_run(
        in_tmp, inverted_pendulum_random_npz, monkeypatch):
    """The kill test's purge, made deterministic: resumed from the step-20 checkpoint of a finished run (its folder
    holds every event up to step 60), the run writes the steps after 20 again. TensorBoard must show each scalar
    once, as before (those of step 20 kept, the later ones replaced), and the run must end as it did."""
    copies, atomic_write = {}, dd.atomic_write

    def keep_every_checkpoint(target, write):
        atomic_write(target, write)
        step = torch.load(target, weights_only=True)["global_step"]
        copies[step] = f"step{len(copies)}.pt"
        shutil.copy(target, copies[step])

    monkeypatch.setattr(dd, "atomic_write", keep_every_checkpoint)
    dd.main(dd.parse_args(["--dataset", inverted_pendulum_random_npz, *TINY, "--total-steps", "60", "--eval-every",
                           "30", "--log-every", "10", "--save-model", "--checkpoint-every", "20"]))
    assert sorted(copies) == [20, 30, 40, 60]
    run_dir = only_run_dir(str(in_tmp))
    before, end = training_scalars(run_dir), torch.load(copies[60], weights_only=True)
    dd.main(dd.parse_args(["--resume", copies[20]]))
    assert training_scalars(run_dir) == before
    again = torch.load(os.path.join(run_dir, "decision_diffuser.pt"), weights_only=True)
    assert_same_tensors({key: end[key] for key in RESUMED}, {key: again[key] for key in RESUMED})


def test_resume_refuses_what_would_not_continue_the_run_and_accepts_its_own_flags(in_tmp, inverted_pendulum_random_npz):
    """A flag that contradicts the checkpoint fails with one line naming it, and so do another device and other data
    under the run's dataset path; the run's own flags are accepted, and a higher --total-steps extends the run
    exactly as if it had been asked for from the start."""
    shutil.copy(inverted_pendulum_random_npz, "data.npz")
    cli = ["--dataset", "data.npz", *TINY, "--total-steps", "20", "--eval-every", "1000", "--log-every", "10",
           "--eval-episodes", "1"]
    dd.main(dd.parse_args([*cli, "--save-model", "--exp-name", "short"]))
    checkpoint = glob.glob("runs/*short*/decision_diffuser.pt")[0]
    cases = [(["--seed", "7"], "error: --seed 7 contradicts the checkpoint (1); a resumed run keeps its own settings: "
              "drop the flag, or start a new run"), (["--dataset", "other.npz"], "--dataset other.npz contradicts"),
             (["--dim-mults", "1", "4"], "--dim-mults (1, 4) contradicts the checkpoint ((1, 2))"),
             (["--sampler", "ddpm"], "--sampler ddpm"), (["--ema-decay", "0.99"], "--ema-decay 0.99"),
             ([], "--total-steps 20 must exceed the checkpoint's step 20")]
    for flags, fragment in cases:
        with pytest.raises(SystemExit) as error:
            dd.main(dd.parse_args(["--resume", checkpoint, *flags]))
        assert "\n" not in str(error.value) and fragment in str(error.value), (fragment, str(error.value))
    torch.save({**torch.load(checkpoint, weights_only=True), "device": "cuda"}, "cuda.pt")
    with pytest.raises(SystemExit, match="the run trained on cuda, not cpu"):
        dd.main(dd.parse_args(["--resume", "cuda.pt", "--total-steps", "40"]))
    dd.main(dd.parse_args(["--resume", checkpoint, *cli, "--total-steps", "40"]))  # the run's own flags, extended
    dd.main(dd.parse_args([*cli, "--total-steps", "40", "--save-model", "--exp-name", "long"]))
    extended, long = (torch.load(glob.glob(f"runs/*{name}*/*.pt")[0], weights_only=True) for name in ("short", "long"))
    assert extended["global_step"] == 40
    assert_same_tensors({key: extended[key] for key in RESUMED}, {key: long[key] for key in RESUMED})
    write_npz("data.npz", source=inverted_pendulum_random_npz, rewards=np.zeros(300, np.float32))  # other data there
    with pytest.raises(SystemExit, match="is not the data of the run"):
        dd.main(dd.parse_args(["--resume", checkpoint, "--total-steps", "60"]))


def test_random_states_survive_weights_only_loading(tmp_path):
    """numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: random_state stores a tensor."""
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save({"random_state": dd.random_state()}, tmp_path / "state.pt")
    draws = lambda: (random.random(), np.random.rand(), np.random.normal(), torch.rand(1).item())  # noqa: E731
    first = draws()
    dd.set_random_state(torch.load(tmp_path / "state.pt", weights_only=True)["random_state"])
    assert draws() == first
