"""Decision Diffuser (DD) for offline RL, in one file.

Paper: A. Ajay, Y. Du, A. Gupta, J. Tenenbaum, T. Jaakkola, P. Agrawal, "Is Conditional Generative Modeling all you
need for Decision-Making?", ICLR 2023, arXiv:2211.15657. "DD Eq. (n)" below cites this paper.

What this file implements, in the paper's terms (its Section 3 and Algorithm 1):
  * Plans of states only, x(tau) = (s_t, ..., s_{t+H-1}) (DD Eq. (3)), from a return-conditioned denoising diffusion
    model eps_theta(x_k, y, k), a temporal U-Net (DDPM, Ho et al. 2020, arXiv:2006.11239; cosine schedule of Nichol &
    Dhariwal 2021, arXiv:2102.09672); actions from an inverse dynamics model a_t = f_phi(s_t, s_t+1) (DD Eq. (4)).
  * Both trained jointly on L(theta, phi) (DD Eq. (6)), the return dropped with probability p; planning with
    classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598), eps_u + w (eps_c - eps_u) (DD Eq. (5)), s_t
    inpainted and low-temperature sampling (DD Algorithm 1); also DDIM (Song et al. 2021, arXiv:2010.02502).
What it leaves out: the paper's K = 20 state history (the released code also conditions on s_t only), constraint and
skill conditioning (DD Section 3.3), warm-starting plans from the previous step (DD Appendix E).
Checked against: anuragajay/decision-diffuser (the authors' code, `code/diffuser`, config/locomotion_config.py);
defaults follow the released code, the paper's values are reachable by flags. Departures are marked `# Deviation:`.

Commands (datasets follow docs/datasets.md; the first is the small configuration on a Pendulum set, which
`python benchmarks/diffuser_sampling.py --dataset data/pendulum.npz --make-pendulum-dataset` writes):
    python decision_diffuser.py --dataset data/pendulum.npz --horizon 16 --dim 32 --dim-mults 1 2 \
        --n-diffusion-steps 20 --total-steps 2000 --batch-size 64 --gradient-accumulate-every 1 --ema-start 500 \
        --learning-rate 1e-3 --normalizer limits --sampler ddim --sampling-steps 10 --save-model
    python decision_diffuser.py --dataset mujoco/hopper/expert-v0 --download-dataset --save-model  # faithful: GPU
    python decision_diffuser.py --eval-checkpoint runs/<run_name>/decision_diffuser.pt --sampler ddim
    python decision_diffuser.py --resume runs/<run_name>/decision_diffuser.pt  # exactly; --total-steps N extends it
"""

import contextlib
import copy
import glob
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT = "decision_diffuser"
CHECKPOINT_VERSION = 2


@dataclass
class Args:
    # Each comment is the flag's --help text; defaults follow the released code (config/locomotion_config.py).
    exp_name: str = SCRIPT  # part of the run name `{env_id}__{exp_name}__{seed}__{unix_time}`
    seed: int = 1  # seed of python, numpy and torch; evaluation env i resets with seed + 10000 + i
    torch_deterministic: bool = True  # set `torch.backends.cudnn.deterministic` (CPU runs are deterministic anyway)
    cuda: bool = True  # train on CUDA when it is available
    compile: bool = False  # torch.compile the loss and the guided noise prediction (slow first steps)
    track: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project_name: str = "rl-reference"  # the Weights & Biases project
    wandb_entity: str | None = None  # the Weights & Biases entity (team); None means your default
    capture_video: bool = False  # record the final evaluation's episodes to `videos/{run_name}/` (pip install moviepy)
    dataset: str | None = None  # a .npz (docs/datasets.md), a D4RL .hdf5, or a Minari id (required to train)
    download_dataset: bool = False  # let minari download a Minari id that is not on this machine (needs internet)
    env_id: str | None = None  # Gymnasium id to evaluate in; None means the dataset's own env id
    horizon: int = 100  # plan length H (released code: 100); divisible by 2**(len(dim_mults) - 1)
    n_diffusion_steps: int = 200  # diffusion steps K of the cosine schedule (released code: 200; paper: 100)
    dim: int = 128  # U-Net base channels and size of the time and return embeddings (released code: 128)
    dim_mults: tuple[int, ...] = (1, 4, 8)  # channel multipliers of the U-Net levels (released code: 1 4 8)
    kernel_size: int = 5  # Conv1d kernel size over time in every residual block (released code: 5)
    inv_hidden_dim: int = 256  # width of the 2 hidden layers of f_phi (released code: 256; paper: 512)
    normalizer: Literal["cdf", "limits"] = "cdf"  # states and actions to [-1, 1]: empirical CDF (released) or min-max
    cdf_knots: int = 1001  # quantiles per dimension of the CDF normaliser (released code: every distinct value)
    condition_dropout: float = 0.25  # p, the chance of dropping the return in training (released code, paper: 0.25)
    guidance_weight: float = 1.2  # w in eps_u + w (eps_c - eps_u) (released code: 1.2; paper: 1.2 to 1.8)
    discount: float = 0.99  # discount of the conditioning return sum_k gamma^k r_{t+k} (released code: 0.99)
    returns_scale: float | None = None  # divide returns by this; None: D4RL's for D4RL .hdf5s, else the data's range
    termination_penalty: float = -100.0  # added to the last reward of terminated episodes (released code: -100)
    test_return: float = 0.9  # scaled return y that plans are conditioned on at evaluation (released code: 0.9)
    total_steps: int = 1_000_000  # optimiser steps (released code: 1e6; paper: 2e6)
    learning_rate: float = 2e-4  # Adam learning rate (released code: 2e-4)
    batch_size: int = 32  # windows per micro-batch (released code: 32)
    gradient_accumulate_every: int = 2  # micro-batches per step, computed as one batch (released code: 2)
    ema_decay: float = 0.995  # EMA decay of the evaluation weights (released code: 0.995)
    ema_every: int = 10  # update the EMA weights every N optimiser steps (released code: 10)
    ema_start: int = 2000  # before this step the EMA weights are a plain copy (released code: 2000)
    sampler: Literal["ddpm", "ddim"] = "ddpm"  # ddpm: all K steps (released code); ddim: --sampling-steps steps
    sampling_steps: int = 20  # DDIM steps, a strided subsequence of the K training steps (with --sampler ddim)
    ddim_eta: float = 0.0  # DDIM eta (Song et al. Eq. (16)): 0 deterministic; 1 with S = K is DDPM
    temperature: float = 0.5  # scales x_K's and each noise's std (released: 0.5); paper's alpha 0.5 (variance) = 0.707
    eval_every: int = 100_000  # evaluate the EMA model every N optimiser steps (and at the end)
    eval_episodes: int = 10  # episodes per evaluation, run in parallel in a vector env (released code: 10)
    log_every: int = 1000  # write losses to TensorBoard and print a progress line every N optimiser steps
    save_model: bool = False  # write `runs/{run_name}/decision_diffuser.pt` (all --resume needs) at evals and the end
    checkpoint_every: int | None = None  # with --save-model, also write the checkpoint every N optimiser steps
    resume: str | None = None  # go on with this checkpoint's run exactly, its flags kept (--total-steps may extend it)
    eval_checkpoint: str | None = None  # evaluation-only mode: load this checkpoint; sampling flags still apply
    eval_seed: int | None = None  # seed of --eval-checkpoint's episodes; default: the checkpoint's (its run's states)


# ======================================================================================================================
# The paper: plans (DD Eq. (3)), eps_theta, f_phi, the loss (DD Eq. (6)), guided planning (DD Algorithm 1), train_step
# ======================================================================================================================
def discounted_returns(data, gamma: float, termination_penalty: float) -> np.ndarray:
    """y(tau) before scaling: R_t = sum_{k >= t} gamma^{k-t} r_k to the episode's end, a termination penalised."""
    rewards = data["rewards"].astype(np.float64) + termination_penalty * data["terminals"]
    ends = data["terminals"] | data["timeouts"]
    returns, running = np.zeros(len(rewards)), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        returns[t] = running = rewards[t] + (0.0 if ends[t] else gamma * running)
    return returns.astype(np.float32)


class PlanWindows:
    """Plans s_t..s_{t+H-1} with their actions (padded ones masked out of the loss) and returns y(tau). A terminated
    episode stays at s_T: every row starts a plan, padded with copies of s_T; after a truncation nothing is known: only
    rows whose plan ends by s_T do. Deviation: the released code pads every episode, with zeros in raw units."""

    def __init__(self, data, state_norm, action_norm, horizon, device):
        ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1  # exclusive episode ends
        states, actions, valid, rows, starts, offset = [], [], [], [], [], 0
        for begin, end in zip(np.concatenate([[0], ends[:-1]]), ends):
            length, terminated = end - begin, data["terminals"][end - 1]
            pad = horizon if terminated else 1  # copies of s_T after the episode's own states
            final = data["next_observations"][end - 1 : end]  # (1, obs_dim): the real final state s_T
            states.append(np.concatenate([data["observations"][begin:end], np.repeat(final, pad, 0)]))
            actions.append(np.concatenate([data["actions"][begin:end], np.zeros((pad, data["actions"].shape[1]))]))
            valid.append(np.arange(length + pad) < length)
            first = np.arange(length if terminated else max(length + 2 - horizon, 0))  # plans ending by s_T
            rows.append(begin + first)
            starts.append(offset + first)
            offset += length + pad
        if not sum(len(first) for first in starts):
            fail(f"no episode holds {horizon} states and none terminates: lower --horizon")
        self.states = state_norm.normalize(torch.as_tensor(np.concatenate(states), device=device))  # (M, obs_dim)
        self.actions = action_norm.normalize(torch.as_tensor(np.concatenate(actions).astype(np.float32), device=device))
        self.valid = torch.as_tensor(np.concatenate(valid), device=device)  # (M,) a_t is a real action
        self.starts = torch.as_tensor(np.concatenate(starts), device=device)  # (W,) where plan w begins in states
        self.returns = torch.as_tensor(data["scaled_returns"][np.concatenate(rows)], device=device)  # (W,) its y(tau)
        self.offsets = torch.arange(horizon, device=device)  # (H,)

    def sample(self, batch_size: int):
        """(states (B, H, obs), actions (B, H, act), valid (B, H), returns (B, 1)) of uniformly drawn plans."""
        plans = torch.randint(0, len(self.starts), (batch_size,), device=self.starts.device)
        index = self.starts[plans, None] + self.offsets  # (B, H)
        return self.states[index], self.actions[index], self.valid[index], self.returns[plans, None]


# ---- Networks: the noise model eps_theta(x_k, y, k), a temporal U-Net, and the inverse dynamics f_phi(s_t, s_t+1) ----
class SinusoidalEmbedding(nn.Module):
    """Transformer-style embedding of the diffusion step k: [sin(k w_i), cos(k w_i)], w_i = 10000^(-i/(d/2-1))."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("frequencies", torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2 - 1)))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        angles = k.float()[:, None] * self.frequencies[None]  # (B, dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, dim)


def conv_block(channels_in: int, channels_out: int, kernel_size: int) -> nn.Sequential:
    """Conv1d over time (same length) -> GroupNorm(8) -> Mish, as in the released U-Net."""
    return nn.Sequential(nn.Conv1d(channels_in, channels_out, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(8, channels_out), nn.Mish())


class ResidualTemporalBlock(nn.Module):
    """Two conv blocks; the projected [time | return] embedding is added over time after the first; 1x1 residual."""

    def __init__(self, channels_in: int, channels_out: int, embed_dim: int, kernel_size: int):
        super().__init__()
        self.block1 = conv_block(channels_in, channels_out, kernel_size)
        self.block2 = conv_block(channels_out, channels_out, kernel_size)
        self.embed_proj = nn.Sequential(nn.Mish(), nn.Linear(embed_dim, channels_out))
        self.residual = nn.Conv1d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.embed_proj(embed)[:, :, None]  # (B, C_out, H) + (B, C_out, 1)
        return self.block2(h) + self.residual(x)  # (B, C_out, H)


class TemporalUnet(nn.Module):
    """eps_theta(x_k, y, k): a 1-D U-Net over the plan's time axis, states as channels (DD Section 3.1); each level
    has two residual blocks, then halves time. Time (sinusoidal -> MLP) and return (MLP) embeddings concatenated."""

    def __init__(self, obs_dim: int, horizon: int, dim: int, dim_mults, kernel_size: int):
        super().__init__()
        widths = [obs_dim] + [dim * m for m in dim_mults]
        levels, embed_dim = list(zip(widths[:-1], widths[1:])), 2 * dim  # [(C_in, C_out)] per level; [time | return]
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, 4 * dim), nn.Mish(),
                                      nn.Linear(4 * dim, dim))
        self.returns_mlp = nn.Sequential(nn.Linear(1, dim), nn.Mish(), nn.Linear(dim, 4 * dim), nn.Mish(),
                                         nn.Linear(4 * dim, dim))
        self.downs = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(levels):  # the last level keeps its length
            self.downs.append(nn.ModuleList([
                ResidualTemporalBlock(c_in, c_out, embed_dim, kernel_size),
                ResidualTemporalBlock(c_out, c_out, embed_dim, kernel_size),
                nn.Identity() if i == len(levels) - 1 else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1)]))
        self.mid1, self.mid2 = (ResidualTemporalBlock(widths[-1], widths[-1], embed_dim, kernel_size) for _ in range(2))
        self.ups = nn.ModuleList()
        for c_in, c_out in reversed(levels[1:]):
            self.ups.append(nn.ModuleList([
                ResidualTemporalBlock(2 * c_out, c_in, embed_dim, kernel_size),
                ResidualTemporalBlock(c_in, c_in, embed_dim, kernel_size),
                nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1)]))
        self.final = nn.Sequential(conv_block(dim, dim, kernel_size), nn.Conv1d(dim, obs_dim, 1))

    def forward(self, x: torch.Tensor, k: torch.Tensor, returns: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x_k (B, H, obs_dim), k (B,), returns (B, 1), keep (B,): 1 the return, 0 the null condition (as released)."""
        embed = torch.cat([self.time_mlp(k), self.returns_mlp(returns) * keep[:, None]], dim=-1)  # (B, 2 dim)
        h = x.transpose(1, 2)  # (B, obs_dim, H): states are channels, time is the convolved axis
        skips = []
        for block1, block2, down in self.downs:
            h = block2(block1(h, embed), embed)
            skips.append(h)
            h = down(h)  # (B, C, H / 2) except at the last level
        h = self.mid2(self.mid1(h, embed), embed)
        for block1, block2, up in self.ups:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, 2 C, H_level): skip connection
            h = up(block2(block1(h, embed), embed))  # (B, C_in, 2 H_level)
        return self.final(h).transpose(1, 2)  # (B, H, obs_dim)


def inverse_dynamics_mlp(obs_dim: int, act_dim: int, hidden_dim: int) -> nn.Sequential:
    """DD Eq. (4): a_t = f_phi(s_t, s_t+1) on normalised states and actions; 2 hidden ReLU layers (released code)."""
    return nn.Sequential(nn.Linear(2 * obs_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                         nn.Linear(hidden_dim, act_dim))


# ---- Diffusion: the schedule, the loss L(theta, phi), planning (DD Algorithm 1) and one training step ----------------
class CosineSchedule(nn.Module):
    """The K-step cosine schedule and the DDPM constants derived from it, as buffers (they follow .to(device))."""

    def __init__(self, n_steps: int, s: float = 0.008):
        super().__init__()
        # Nichol & Dhariwal Eq. (17): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/K + s)/(1 + s)) pi/2), betas <= 0.999
        t = np.linspace(0.0, 1.0, n_steps + 1)
        f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
        betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, 0.999)
        alphas_cumprod = np.cumprod(1.0 - betas)  # alpha_bar_k, k = 1..K (index k-1)
        alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
        constants = dict(betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=alphas_cumprod_prev,
                         # DDPM Eq. (7): beta_tilde = (1 - alpha_bar_{k-1}) / (1 - alpha_bar_k) beta_k
                         posterior_variance=betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
                         # DDPM Eq. (7): mu_tilde = coef1 x_0 + coef2 x_k
                         posterior_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod),
                         posterior_coef2=(1 - alphas_cumprod_prev) * np.sqrt(1 - betas) / (1 - alphas_cumprod))
        for name, value in constants.items():
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32))
        self.n_steps = n_steps


def inpaint(x, state):
    """Condition on the current state: index 0 of every plan is s_t exactly (DD Algorithm 1: s_t is given)."""
    return torch.cat([state[:, None], x[:, 1:]], dim=1)


def loss_fn(nets, schedule, states, actions, valid, returns, condition_dropout: float):
    """DD Eq. (6), L(theta, phi), weighed as the released code does: 1/2 (diffusion loss + inverse dynamics loss)."""
    batch, horizon, _ = states.shape
    # DDPM Algorithm 1: k ~ Uniform{1..K}, eps ~ N(0, I); eps at index 0 is zero because s_t there is given.
    k, noise = torch.randint(0, schedule.n_steps, (batch,), device=states.device), torch.randn_like(states)
    noise[:, 0] = 0.0
    alpha_bar = schedule.alphas_cumprod[k][:, None, None]  # (B, 1, 1)
    x_k = inpaint(alpha_bar.sqrt() * states + (1 - alpha_bar).sqrt() * noise, states[:, 0])  # DDPM Eq. (4), s_t given
    # DD Eq. (6): beta ~ Bern(p) replaces y(tau) by the null condition; keep = 1 - beta.
    keep = torch.bernoulli(torch.full((batch,), 1.0 - condition_dropout, device=states.device))  # (B,)
    eps_pred = nets.unet(x_k, k, returns, keep)  # (B, H, obs_dim)
    # DD Eq. (6), first term (DDPM Eq. (14), L_simple): weight 0 at index 0 (the inpainted s_t), mean over entries.
    weights = (torch.arange(horizon, device=states.device) > 0).float()[:, None]  # (H, 1)
    diffusion_loss = ((eps_pred - noise) ** 2 * weights).mean()
    # DD Eq. (6), second term: || a_t - f_phi(s_t, s_t+1) ||^2 over the windows' transitions.
    # Deviation: the released code also fits the pairs inside the padding (zero actions); we mask them out.
    pairs = torch.cat([states[:, :-1], states[:, 1:]], dim=-1)  # (B, H-1, 2 obs_dim)
    errors = ((nets.inverse_dynamics(pairs) - actions[:, :-1]) ** 2).mean(-1)  # (B, H-1)
    mask = valid[:, :-1].float()
    inv_loss = (errors * mask).sum() / mask.sum().clamp_min(1.0)
    return 0.5 * (diffusion_loss + inv_loss), diffusion_loss.detach(), inv_loss.detach()


def guided_epsilon(unet: TemporalUnet, x_k, k, returns, guidance_weight: float):
    """DD Eq. (5): eps = eps_theta(x_k, null, k) + w (eps_theta(x_k, y, k) - eps_theta(x_k, null, k)) (Ho & Salimans
    Eq. (6) with w = 1 + w_HS). Both predictions come from one forward pass over the batch stacked twice."""
    keep = torch.cat([torch.ones(len(x_k), device=x_k.device), torch.zeros(len(x_k), device=x_k.device)])  # (2B,)
    eps = unet(torch.cat([x_k, x_k]), torch.cat([k, k]), torch.cat([returns, returns]), keep)  # (2B, H, obs_dim)
    eps_cond, eps_uncond = eps.chunk(2)  # (B, H, obs_dim) each
    return eps_uncond + guidance_weight * (eps_cond - eps_uncond)


def ddim_timesteps(n_steps: int, sampling_steps: int) -> list[int]:
    """A strided subsequence of the K training steps, ascending; S = K gives every step."""
    return sorted(set(np.linspace(0, n_steps - 1, sampling_steps).round().astype(int).tolist()))


@torch.no_grad()
def sample(epsilon_fn, schedule, state, horizon, steps, eta=None, temperature=0.5, initial_noise=None, generator=None):
    """Plans (B, H, obs_dim) by DD Algorithm 1 with `epsilon_fn(x_k, k)` over `steps`: eta None, DDPM ancestral sampling
    (DDPM Algorithm 2); else DDIM (Song et al. Eqs. (12), (16)). Low temperature: `temperature` multiplies x_K and
    every z, so it scales their standard deviation (released code); the paper's alpha scales the variance."""
    batch, shape = state.shape[0], (state.shape[0], horizon, state.shape[-1])  # plans are (B, H, obs_dim)
    noise0 = torch.randn(shape, device=state.device, generator=generator) if initial_noise is None else initial_noise
    x = inpaint(temperature * noise0, state)  # x_K ~ N(0, alpha^2 I), s_t inpainted
    for i in reversed(range(len(steps))):
        k = torch.full((batch,), steps[i], device=state.device, dtype=torch.long)
        alpha_bar = schedule.alphas_cumprod[steps[i]]  # x0_hat: DDPM Eq. (4) solved for x_0, clamped to [-1, 1]
        x0 = ((x - (1 - alpha_bar).sqrt() * epsilon_fn(x, k)) / alpha_bar.sqrt()).clamp(-1.0, 1.0)
        if eta is None:  # DDPM Eq. (7): x_{k-1} = mu_tilde(x_k, x_0) + alpha sqrt(beta_tilde) z, no noise at the end
            x = schedule.posterior_coef1[steps[i]] * x0 + schedule.posterior_coef2[steps[i]] * x
            if i > 0:
                z = torch.randn(shape, device=state.device, generator=generator)
                x = x + temperature * schedule.posterior_variance[steps[i]].sqrt() * z
        else:
            alpha_bar_prev = schedule.alphas_cumprod[steps[i - 1]] if i > 0 else torch.ones_like(alpha_bar)
            eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()  # the noise implied by the clamped x0_hat
            sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()  # (16)
            x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp_min(0).sqrt() * eps  # Eq. (12)
            if eta > 0 and i > 0:
                x = x + temperature * sigma * torch.randn(shape, device=state.device, generator=generator)
        x = inpaint(x, state)
    return x


@torch.no_grad()
def evaluate(nets, schedule, state_norm, action_norm, envs, args: Args, target_return: float, device,
             guided=guided_epsilon):
    """DD Algorithm 1, one episode in each env of `envs` (env i resets with seed + 10000 + i), all still-running envs
    planned in one batch. Returns the episode returns and the milliseconds per batched planning step."""
    count, ddpm = envs.num_envs, args.sampler == "ddpm"
    steps = range(schedule.n_steps) if ddpm else ddim_timesteps(schedule.n_steps, args.sampling_steps)
    # Its own noise generator, seeded alike in every evaluation: evaluation-only mode reproduces the run's evaluations.
    generator = torch.Generator(device=device).manual_seed(args.seed + 10_000)
    obs, _ = envs.reset(seed=[args.seed + 10_000 + i for i in range(count)])
    returns, done, plan_time, plan_calls = np.zeros(count), np.zeros(count, dtype=bool), 0.0, 0
    actions = np.zeros((count,) + envs.single_action_space.shape, np.float32)
    while not done.all():
        active = np.flatnonzero(~done)
        start = time.perf_counter()
        state = state_norm.normalize(torch.as_tensor(obs[active], dtype=torch.float32, device=device))  # (E, obs)
        target = torch.full((len(active), 1), target_return, device=device)  # constant conditioning every step
        x = sample(lambda x_k, k: guided(nets.unet, x_k, k, target, args.guidance_weight), schedule, state,  # Eq. (5)
                   args.horizon, steps, None if ddpm else args.ddim_eta, args.temperature, generator=generator)
        pair = torch.cat([x[:, 0], x[:, 1]], dim=-1)  # (E, 2 obs_dim): (s_t, s_t+1) from the plan
        act = action_norm.unnormalize(nets.inverse_dynamics(pair)).cpu().numpy()  # DD Eq. (4), env units
        plan_time, plan_calls = plan_time + time.perf_counter() - start, plan_calls + 1
        actions[active] = np.clip(act, envs.single_action_space.low, envs.single_action_space.high)
        obs, reward, terminated, truncated, _ = envs.step(actions)  # finished envs step too; their steps are ignored
        returns[active] += reward[active]
        done[active] |= (terminated | truncated)[active]
    return returns, 1000.0 * plan_time / max(plan_calls, 1)


def train_step(nets, ema, schedule, optimizer, windows: PlanWindows, step: int, args: Args, compute_loss=loss_fn):
    """One optimiser step: the released code's gradient accumulation as one batch (no batch norm: same gradient)."""
    # Plans x_0(tau) with their actions and returns y(tau), drawn uniformly from the dataset (DD Eq. (3)).
    batch = windows.sample(args.batch_size * args.gradient_accumulate_every)  # (states, actions, valid, returns)
    loss, diffusion_loss, inv_loss = compute_loss(nets, schedule, *batch, args.condition_dropout)  # DD Eq. (6)
    # One Adam step on theta and phi together.
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    # Evaluation weights (released code): a plain copy before ema_start, then theta_ema <- d theta_ema + (1 - d) theta
    if step % args.ema_every == 0:
        with torch.no_grad():
            if step < args.ema_start:
                torch._foreach_copy_(list(ema.parameters()), list(nets.parameters()))
            else:
                torch._foreach_lerp_(list(ema.parameters()), list(nets.parameters()), 1.0 - args.ema_decay)
    return loss, diffusion_loss, inv_loss


# ======================================================================================================================
# Main: set-up, the training loop, evaluation and logging
# ======================================================================================================================
def main(args: Args):
    validate_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    checkpoint = load_checkpoint(args.eval_checkpoint or args.resume) if args.eval_checkpoint or args.resume else None
    if args.resume:  # the run's state and folder come from the checkpoint; its settings are checked, not adopted
        check_resume_flags(args, checkpoint)
    if args.eval_checkpoint:  # the checkpoint decides the architecture, normalisers and env; sampling flags stay
        env_id, env_kwargs, obs_dim, act_dim, state_norm, action_norm, returns_offset, returns_scale, refs = \
            adopt_checkpoint_settings(args, checkpoint)
        source = f"checkpoint {args.eval_checkpoint}"
    else:
        data = load_dataset(args.dataset, args.download_dataset, args.env_id)
        env_id, env_kwargs, refs, source = data["env_id"], data["env_kwargs"], data["ref_scores"], args.dataset
        obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
        data["returns"] = discounted_returns(data, args.discount, args.termination_penalty)
        returns_offset, returns_scale, returns_text = returns_scaling(data, args)
        data["scaled_returns"] = (data["returns"] - returns_offset) / returns_scale  # conditioning targets y(tau)
        # Deviation: the state normaliser is fitted on observations and next observations (released code: observations
        # only), so the final states s_T that end the plans (see PlanWindows) lie in its range too.
        state_norm = Normalizer.fit(np.concatenate([data["observations"], data["next_observations"]]),
                                    args.normalizer, args.cdf_knots)
        action_norm = Normalizer.fit(data["actions"], args.normalizer, args.cdf_knots)
    run_name = checkpoint["run_name"] if args.resume else f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    video_dir = f"videos/{run_name}" if args.capture_video else None

    def make_envs(record: bool):  # the evaluation envs; --capture-video records the final evaluation's episodes
        return gym.vector.SyncVectorEnv([lambda i=i: make_env(env_id, args.seed + 10_000 + i, obs_dim, act_dim, source,
                                                              env_kwargs, video_dir if record else None, f"eval-{i}")
                                         for i in range(args.eval_episodes)])

    if video_dir:  # rendering is checked now, not after training
        make_env(env_id, args.seed + 10_000, obs_dim, act_dim, source, env_kwargs, video_dir).close()
    envs = make_envs(record=args.eval_checkpoint is not None and video_dir is not None)
    state_norm, action_norm = Normalizer(state_norm.knots.to(device)), Normalizer(action_norm.knots.to(device))
    nets = nn.ModuleDict(dict(unet=TemporalUnet(obs_dim, args.horizon, args.dim, args.dim_mults, args.kernel_size),
                              inverse_dynamics=inverse_dynamics_mlp(obs_dim, act_dim, args.inv_hidden_dim))).to(device)
    ema = copy.deepcopy(nets).requires_grad_(False)  # the released code averages both networks
    schedule = CosineSchedule(args.n_diffusion_steps).to(device)
    optimizer = torch.optim.Adam(nets.parameters(), lr=args.learning_rate)
    guided, compute_loss = (torch.compile(fn) if args.compile else fn for fn in (guided_epsilon, loss_fn))
    sampler_text = f"DDPM {args.n_diffusion_steps} steps" if args.sampler == "ddpm" else \
        f"DDIM {len(ddim_timesteps(args.n_diffusion_steps, args.sampling_steps))} steps (eta {args.ddim_eta:g})"
    if args.eval_checkpoint:  # evaluation-only mode: the EMA weights plan
        ema.load_state_dict(checkpoint["ema_model"])
        returns, ms = evaluate(ema, schedule, state_norm, action_norm, envs, args, args.test_return, device, guided)
        print(f"evaluation of {args.eval_checkpoint} (step {checkpoint['global_step']}) on {env_id}, {sampler_text}, "
              f"{ms:.1f} ms per planning step\nfinal evaluation: {describe_returns(returns, refs)}")
        envs.close()
        return returns
    windows = PlanWindows(data, state_norm, action_norm, args.horizon, device)
    path = f"runs/{run_name}/{SCRIPT}.pt"
    saved = dict(script=SCRIPT, version=CHECKPOINT_VERSION, args=asdict(args), state_knots=state_norm.knots.cpu(),
                 action_knots=action_norm.knots.cpu(), returns_offset=float(returns_offset), obs_dim=obs_dim,
                 returns_scale=float(returns_scale), env_id=env_id, act_dim=act_dim, ref_scores=refs and list(refs),
                 env_kwargs=env_kwargs, run_name=run_name, device=device.type)
    start = restore_training(checkpoint, saved, path, nets, ema, optimizer) if args.resume else 0
    writer = make_writer(args, run_name, purge_step=start + 1 if args.resume else None)
    print(f"run {run_name}: {env_id}, {len(data['rewards'])} transitions, obs {obs_dim}, actions {act_dim}, U-Net "
          f"{sum(p.numel() for p in nets.unet.parameters()) / 1e6:.2f}M parameters, returns: {returns_text}, sampler "
          f"{sampler_text}, device {device}" + (f", resumed at step {start}" if args.resume else ""))

    def save(step):  # with --save-model: all --resume needs; first flush this step's events (resumes keep them)
        if args.save_model:
            writer.flush()
            state = dict(saved, global_step=step, model=nets.state_dict(), ema_model=ema.state_dict(),
                         optimizer=optimizer.state_dict(), random_state=random_state())
            atomic_write(path, lambda file: torch.save(state, file))

    def run_evaluation(step):  # the EMA weights plan, as in the released code
        returns, ms = evaluate(ema, schedule, state_norm, action_norm, envs, args, args.test_return, device, guided)
        writer.add_scalar("eval/episodic_return", returns.mean(), step)
        writer.add_scalar("eval/ms_per_plan", ms, step)
        if refs is not None:
            writer.add_scalar("eval/normalized_score", normalized_score(returns.mean(), refs), step)
        print(f"eval at step {step}: {describe_returns(returns, refs)} [{sampler_text}, {ms:.1f} ms per plan]",
              flush=True)
        save(step)
        return returns

    progress = Progress(start, args.total_steps)  # steps per second of the last logging interval, evaluations left out
    for step in range(start + 1, args.total_steps + 1):
        loss, diffusion_loss, inv_loss = train_step(nets, ema, schedule, optimizer, windows, step, args, compute_loss)
        if step % args.log_every == 0 or step == args.total_steps:  # the training loop's only host syncs (.item())
            sps, eta = progress.tick(step)
            scalars = {"losses/loss": loss.item(), "losses/diffusion_loss": diffusion_loss.item(),
                       "losses/inv_loss": inv_loss.item(), "charts/SPS": sps}
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
            print(f"step {step}/{args.total_steps} | {sps:.0f} SPS | ETA {eta} | diffusion loss "
                  f"{scalars['losses/diffusion_loss']:.4f} | inv loss {scalars['losses/inv_loss']:.4f}", flush=True)
        if step % args.eval_every == 0 and step != args.total_steps:
            with progress.paused():
                run_evaluation(step)  # and the checkpoint
        elif args.checkpoint_every and step % args.checkpoint_every == 0 and step != args.total_steps:
            with progress.paused():
                save(step)

    if video_dir:
        envs.close()
        envs = make_envs(record=True)
    eval_returns = run_evaluation(args.total_steps)
    print(f"final evaluation: {describe_returns(eval_returns, refs)}")
    if args.save_model:
        print(f"saved checkpoint to {path}")
    envs.close()
    close_writer(args, writer)
    return eval_returns


# ======================================================================================================================
# Not in the paper: argument checks, environments, data, checkpoints, logging and errors
# ======================================================================================================================
def validate_args(args: Args):
    """Reject nonsensical settings up front, with a one-line error."""
    for name in ("horizon n_diffusion_steps dim kernel_size inv_hidden_dim total_steps learning_rate batch_size "
                 "gradient_accumulate_every ema_every eval_every eval_episodes log_every discount").split():
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    factor, levels = 2 ** (len(args.dim_mults) - 1), " ".join(map(str, args.dim_mults))  # the U-Net halves time
    checks = [
        (args.horizon % factor == 0 or args.eval_checkpoint, f"--horizon {args.horizon} must be divisible by {factor} "
         f"(--dim-mults {levels}): valid horizons are {', '.join(str(factor * i) for i in range(1, 6))}, ..."),
        (0 <= args.seed < 2**32 - 20_000, f"--seed must be in [0, 2**32 - 20000) (eval: seed + 10000): {args.seed}"),
        (args.dim_mults and min(args.dim_mults) > 0, "--dim-mults must be positive integers such as 1 4 8"),
        (args.dim % 8 == 0, f"--dim must be a multiple of 8 (GroupNorm with 8 groups), got {args.dim}"),
        (args.kernel_size % 2 == 1, f"--kernel-size must be odd (same-length convolutions), got {args.kernel_size}"),
        (args.horizon >= 2, f"--horizon must be >= 2 (the action needs s_t and s_t+1 from a plan), not {args.horizon}"),
        (args.sampling_steps >= 2, "--sampling-steps must be >= 2 (one DDIM step would denoise pure noise at k = 0)"),
        (args.sampler != "ddim" or args.sampling_steps <= args.n_diffusion_steps,
         f"--sampling-steps ({args.sampling_steps}) cannot exceed --n-diffusion-steps ({args.n_diffusion_steps})"),
        (0.0 <= args.condition_dropout < 1.0, f"--condition-dropout must be in [0, 1), got {args.condition_dropout}"),
        (0.0 < args.ema_decay < 1.0, f"--ema-decay must be in (0, 1), got {args.ema_decay}"),
        (args.discount <= 1.0, f"--discount must be in (0, 1], got {args.discount}"),
        (args.returns_scale is None or args.returns_scale > 0, f"--returns-scale must be > 0: {args.returns_scale}"),
        (min(args.temperature, args.ddim_eta, args.ema_start) >= 0, "--temperature, --ddim-eta, --ema-start: >= 0"),
        (args.cdf_knots >= 2, f"--cdf-knots must be >= 2, got {args.cdf_knots}"),
        (not (args.resume and args.eval_checkpoint), "give either --resume or --eval-checkpoint, not both"),
        (args.checkpoint_every is None or (args.checkpoint_every > 0 and args.save_model),
         f"--checkpoint-every {args.checkpoint_every} needs --save-model and a value > 0 (or drop it)"),
        (args.eval_checkpoint is not None or args.dataset is not None,
         "--dataset is required to train: a .npz (`python sac_continuous.py --env-id Hopper-v5 --export-replay "
         "data/hopper.npz`), a D4RL .hdf5, or a Minari id such as mujoco/hopper/medium-v0")]
    for ok, message in checks:
        if not ok:
            fail(message)
    if args.capture_video:
        try:
            import moviepy  # noqa: F401  (RecordVideo writes mp4 files with it)
        except ImportError:
            fail("--capture-video needs moviepy: pip install moviepy (MuJoCo on a headless machine: MUJOCO_GL=egl)")


def make_env(env_id: str, seed: int, obs_dim: int, act_dim: int, source: str, env_kwargs: dict | None = None,
             video_dir: str | None = None, video_prefix: str = "eval"):
    """One evaluation env, checked: a time limit, a flat bounded Box action space, the dataset's dimensions. With
    `video_dir`, its first episode is recorded there as `{video_prefix}-episode-0.mp4`."""
    try:
        env = gym.make(env_id, **{**(env_kwargs or {}), **({"render_mode": "rgb_array"} if video_dir else {})})
    except gym.error.Error as error:  # an unknown id, or a missing package (MuJoCo envs need requirements.txt)
        fail(f"cannot make environment '{env_id}' ({error}); pass --env-id with a registered id such as Hopper-v5 "
             "(MuJoCo ones need pip install -r requirements.txt)")
    except Exception as error:  # e.g. MUJOCO_GL naming a rendering backend that is not installed
        fail(f"cannot make environment '{env_id}' ({type(error).__name__}: {str(error).partition(chr(10))[0]}); "
             "if MUJOCO_GL is set, check that its backend (egl or osmesa) is installed")
    space, obs_space, spec = env.action_space, env.observation_space, env.spec
    if spec is None or spec.max_episode_steps is None:
        fail(f"{env_id} has no time limit; wrap it in gymnasium.wrappers.TimeLimit or pick an env with one")
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1 or not np.all(np.isfinite(space.low)):
        fail(f"{env_id} has actions {space}; this script needs a flat, bounded Box action space")
    if not isinstance(obs_space, gym.spaces.Box) or obs_space.shape != (obs_dim,) or space.shape != (act_dim,):
        fail(f"dataset {source} has obs_dim {obs_dim} / act_dim {act_dim} but {env_id} has {obs_space.shape} / "
             f"{space.shape}; pass --env-id of the env the data came from")
    if video_dir:
        try:  # one frame now, so a broken rendering set-up fails with a one-line error
            env.reset(seed=seed)
            env.render()
        except Exception as error:
            fail(f"cannot render {env_id} for --capture-video ({type(error).__name__}); on a headless machine "
                 "set MUJOCO_GL=egl (or osmesa, with its libraries installed)")
        with warnings.catch_warnings(action="ignore"):  # one evaluation's recording envs share the folder: no overwrite
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda episode: episode == 0,
                                           name_prefix=video_prefix, disable_logger=True)
    env.action_space.seed(seed)
    return env


KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
# D4RL's random (0) and expert (100) returns for the normalised score (docs/datasets.md; v2 envs).
D4RL_REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
                   "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7)}
# returns_scale (discount 0.99): hopper-medium-expert-v2's is the released code's, the others a reimplementation's.
D4RL_RETURNS_SCALE = {"hopper-medium-expert-v2": 400, "hopper-medium-v2": 350, "hopper-medium-replay-v2": 340,
                      "halfcheetah-medium-expert-v2": 1200, "halfcheetah-medium-v2": 580,
                      "halfcheetah-medium-replay-v2": 550, "walker2d-medium-expert-v2": 550, "walker2d-medium-v2": 480,
                      "walker2d-medium-replay-v2": 470}


def load_dataset(source: str, download: bool, env_id: str | None = None) -> dict:
    """A .npz, D4RL .hdf5 or Minari id (docs/datasets.md) as numpy arrays (KEYS), env_id, env_kwargs, ref_scores."""
    npz, hdf5 = source.lower().endswith(".npz"), source.lower().endswith((".hdf5", ".h5"))
    if not os.path.isfile(source) and (npz or hdf5 or os.path.exists(source) or "/" not in source):
        fail(f"dataset {source} not found; write one with `python sac_continuous.py --env-id Hopper-v5 "
             f"--export-replay {source}` or pass a Minari id such as mujoco/hopper/medium-v0")
    if not os.path.exists(source):
        data = load_minari(source, download)
    else:
        if not (npz or hdf5):
            fail(f"dataset {source}: unknown format; give a .npz, a .hdf5 or a Minari id")
        try:
            if npz:
                with np.load(source, allow_pickle=False) as file:
                    raw = dict(file)
            else:
                import h5py

                with h5py.File(source, "r") as file:  # top-level datasets, then attributes (env_id may be one)
                    raw = {key: file[key][()] for key in file.keys() if isinstance(file[key], h5py.Dataset)}
                    raw.update({key: value for key, value in file.attrs.items() if key not in raw})
        except ImportError:
            fail("reading a D4RL .hdf5 file needs h5py: pip install h5py")
        except Exception as error:
            kind = "an .npz" if npz else "an HDF5"
            fail(f"cannot read {source} ({type(error).__name__}); it is corrupt or not {kind} file")
        if missing := [key for key in KEYS if key not in raw]:
            fail(f"dataset {source} lacks the keys {missing}; it needs {list(KEYS)} (docs/datasets.md)")
        name = np.asarray(raw.get("env_id", "")).item()  # str, or bytes: h5py 3 reads string data as bytes
        name = (name.decode() if isinstance(name, bytes) else str(name)) or None
        refs = (float(raw["ref_min_score"]), float(raw["ref_max_score"]), "the dataset's own references") \
            if "ref_min_score" in raw else None
        data = dict({key: np.asarray(raw[key]) for key in KEYS}, env_id=name, env_kwargs=None, ref_scores=refs)
    n = len(data["rewards"])
    if n < 2 or data["observations"].ndim != 2 or data["actions"].ndim != 2 or any(len(data[k]) != n for k in KEYS):
        fail(f"dataset {source}: expected N >= 2 rows of 2-D observations/actions and N rewards/flags, got shapes "
             f"{ {key: data[key].shape for key in KEYS} }")
    for key in ("observations", "actions", "rewards", "next_observations"):
        data[key] = data[key].astype(np.float32).reshape((n,) if key == "rewards" else (n, -1))
        if not np.all(np.isfinite(data[key])):
            fail(f"dataset {source}: {key} contains NaN or inf")
    data["terminals"], data["timeouts"] = data["terminals"].astype(bool), data["timeouts"].astype(bool)
    if not (data["terminals"][-1] or data["timeouts"][-1]):
        data["timeouts"][-1] = True  # an unfinished last episode is kept and treated as truncated (docs/datasets.md)
    if env_id:  # --env-id replaces the dataset's env and a Minari dataset's recorded arguments for it
        data.update(env_id=env_id, env_kwargs=None)
    if data["env_id"] is None:
        fail(f"dataset {source} names no env (no env_id key); pass --env-id, e.g. --env-id Hopper-v5")
    task = data["env_id"].split("-v")[0].lower()  # references: the dataset's own, Minari's, else D4RL's
    if data["ref_scores"] is None and task in D4RL_REF_SCORES:
        data["ref_scores"] = (*D4RL_REF_SCORES[task], "D4RL v2 references")
    return data


def load_minari(dataset_id: str, download: bool) -> dict:
    """A Minari dataset: episodes hold N+1 observations s_0..s_N, so observations = obs[:-1], next = obs[1:]."""
    try:
        import minari
    except ImportError:
        fail(f"reading the Minari dataset {dataset_id} needs minari: pip install minari")
    if dataset_id not in minari.list_local_datasets() and not download:
        fail(f"Minari dataset {dataset_id} is not on this machine; pass --download-dataset to fetch it")
    try:
        dataset = minari.load_dataset(dataset_id, download=download)
        spec = dataset.recover_environment(eval_env=True).spec  # the evaluation env its metadata records
    except Exception as error:  # minari downloads through huggingface_hub, which its "hf" extra installs
        if isinstance(error, ImportError) and "huggingface" in f"{error.name} {error}":
            fail(f'--download-dataset needs huggingface_hub for Minari\'s hub: pip install "minari[hf]"')
        first_line = (str(error).splitlines() or [""])[0]
        fail(f"cannot load Minari dataset {dataset_id} ({type(error).__name__}: {first_line})")
    parts = {key: [] for key in KEYS}
    for episode in dataset.iterate_episodes():
        obs = np.asarray(episode.observations)
        if obs.dtype == object or obs.ndim != 2:
            fail(f"Minari dataset {dataset_id} has non-flat observations; this script needs a flat Box")
        for key, value in zip(KEYS, (obs[:-1], episode.actions, episode.rewards, obs[1:], episode.terminations,
                                     episode.truncations)):
            parts[key].append(np.asarray(value))
    metadata = getattr(dataset.storage, "metadata", {}) or {}
    refs = (float(metadata["ref_min_score"]), float(metadata["ref_max_score"]), "Minari's references") \
        if "ref_min_score" in metadata and "ref_max_score" in metadata else None
    return dict({key: np.concatenate(value) for key, value in parts.items()}, env_id=spec.id,
                env_kwargs=dict(spec.kwargs, max_episode_steps=spec.max_episode_steps), ref_scores=refs)


def returns_scaling(data: dict, args: Args) -> tuple[float, float, str]:
    """(offset, scale, description) of y = (R - offset) / scale: --returns-scale; the released scale for a D4RL .hdf5
    under its D4RL name (hopper-medium-expert-v2.hdf5 or hopper_medium_expert-v2.hdf5); else the data's own range."""
    if args.returns_scale is not None:
        return 0.0, args.returns_scale, f"--returns-scale {args.returns_scale:g}"
    name = os.path.basename(args.dataset).lower().replace("_", "-")
    if name.endswith(".hdf5") and (scale := D4RL_RETURNS_SCALE.get(name.removesuffix(".hdf5"))) is not None:
        return 0.0, float(scale), f"the released scale {scale} of D4RL's {name.removesuffix('.hdf5')}"
    # Deviation: the released code has no scale for other data; map its discounted returns onto [0, 1] (min-max), so
    # that --test-return 0.9 means "90% of the way from the worst to the best return in the data".
    low, high = float(data["returns"].min()), float(data["returns"].max())
    return low, max(high - low, 1e-6), f"the data's own range [{low:.1f}, {high:.1f}] mapped to [0, 1]"


class Normalizer:
    """Per-dimension piecewise-linear map through `knots` (D, K), knot k to 2 k / (K - 1) - 1, inputs clipped to their
    range: with K quantiles the released code's CDF normaliser (y = 2 F(x) - 1), with (min, max) the min-max one."""

    def __init__(self, knots: torch.Tensor):
        self.knots = knots  # (D, K), non-decreasing along K
        self.levels = torch.linspace(-1.0, 1.0, knots.shape[1], device=knots.device)  # (K,)

    @staticmethod
    def fit(x: np.ndarray, kind: str, n_knots: int) -> "Normalizer":
        # Deviation: K quantiles per dimension instead of every distinct value (a checkpoint of fixed size).
        knots = np.quantile(x.astype(np.float64), np.linspace(0.0, 1.0, n_knots), axis=0).T if kind == "cdf" else \
            np.stack([x.min(0), x.max(0)], axis=1).astype(np.float64)  # (D, K) or (D, 2)
        # Deviation: the released normaliser is the identity on a constant dimension c; we map c to 0 (x -> x - c,
        # unnormalize y -> c + y) so every normalised dimension lies in [-1, 1] like the others.
        constant = knots[:, -1] - knots[:, 0] < 1e-6
        knots[constant] = knots[constant, :1] + np.linspace(-1.0, 1.0, knots.shape[1])
        return Normalizer(torch.as_tensor(knots, dtype=torch.float32))

    def _interp(self, x, xp, fp):
        """Piecewise-linear interpolation of x (..., D) through per-dimension points xp (D, K) -> fp (D, K)."""
        flat = torch.minimum(torch.maximum(x.reshape(-1, x.shape[-1]).T.contiguous(), xp[:, :1]), xp[:, -1:])  # (D, M)
        right = torch.searchsorted(xp.contiguous(), flat, right=True).clamp(1, xp.shape[1] - 1)  # (D, M)
        x0, x1 = xp.gather(1, right - 1), xp.gather(1, right)
        y0, y1 = fp.gather(1, right - 1), fp.gather(1, right)
        slope = torch.where(x1 > x0, (y1 - y0) / (x1 - x0).clamp_min(1e-12), torch.zeros_like(x0))
        return (y0 + slope * (flat - x0)).T.reshape(x.shape)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self._interp(x, self.knots, self.levels.expand_as(self.knots))

    def unnormalize(self, y: torch.Tensor) -> torch.Tensor:
        return self._interp(y, self.levels.expand_as(self.knots), self.knots)


def normalized_score(mean_return: float, refs) -> float | None:
    """100 (R - R_random) / (R_expert - R_random), or None without references (docs/datasets.md)."""
    return None if refs is None else 100.0 * (mean_return - refs[0]) / (refs[1] - refs[0])


def describe_returns(returns: np.ndarray, refs) -> str:
    text = f"{returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes"
    score = normalized_score(returns.mean(), refs)
    return text if score is None else f"{text} (normalized score {score:.1f}, {refs[2]})"


class Progress:
    """Steps per second over the last logging interval, evaluations left out, and the time left at that speed."""

    def __init__(self, step: int, total: int):
        self.total, self.step, self.clock = total, step, time.perf_counter()

    @contextlib.contextmanager
    def paused(self):  # wrap evaluations and checkpoints: their time does not count as training time
        start = time.perf_counter()
        yield
        self.clock += time.perf_counter() - start

    def tick(self, step: int, warming_up: bool = False) -> tuple[float, str]:
        """The speed since the last tick and the ETA text (none during a random warm-up); starts the next interval."""
        now = time.perf_counter()
        sps, self.step, self.clock = (step - self.step) / max(now - self.clock, 1e-9), step, now
        eta = int((self.total - step) / max(sps, 1e-9))
        return sps, "after warm-up" if warming_up else f"{eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s"


def make_writer(args, run_name: str, purge_step: int | None = None) -> SummaryWriter:
    """TensorBoard writer for runs/{run_name}. With --track, Weights & Biases starts first: its sync_tensorboard
    patch only sees writers created after wandb.init. From purge_step on, TensorBoard drops older events."""
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs Weights & Biases: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=run_name, save_code=True)
    writer = SummaryWriter(f"runs/{run_name}", purge_step=purge_step)
    table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}", purge_step or 0)
    return writer


def close_writer(args, writer: SummaryWriter):
    writer.close()
    if args.track:
        import wandb

        wandb.finish()


def atomic_write(path: str, write):
    """Write through `write(file)` into a temporary file beside `path`, flush it to disk, then rename it over
    `path`: a crash leaves the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path: str) -> dict:
    """Load with weights_only=True and check it is one of ours; every failure is a one-line error."""
    if not os.path.isfile(path):
        fail(f"checkpoint '{path}' does not exist; train with --save-model to write runs/<run_name>/{SCRIPT}.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"cannot read checkpoint '{path}' ({type(error).__name__}); it is corrupt or not a torch file")
    script = checkpoint.get("script") if isinstance(checkpoint, dict) else None
    if script != SCRIPT:
        fail(f"checkpoint '{path}' was written by {script or 'another program'}, not {SCRIPT}.py; load it with "
             f"{script + '.py' if script else 'the script that wrote it'}")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        fail(f"checkpoint '{path}' has format version {checkpoint.get('version')}, not {CHECKPOINT_VERSION}: "
             "re-create it with this script's --save-model")
    missing = [key for key in ("args model ema_model state_knots action_knots env_id obs_dim act_dim returns_offset "
                               "returns_scale ref_scores global_step").split() if key not in checkpoint]
    if missing or not isinstance(checkpoint["args"], dict):
        fail(f"checkpoint '{path}' lacks the fields {missing or ['args']}: re-create it with --save-model")
    return checkpoint


def random_state() -> dict:
    """The python, numpy, torch and CUDA (one per GPU, none without) generators' states in types that torch.load reads
    with weights_only=True: numpy's key array as a tensor (it refuses ndarrays), the others as they are."""
    kind, keys, *rest = np.random.get_state()
    return dict(python=random.getstate(), numpy=(kind, torch.from_numpy(keys.astype(np.int64)), *rest),
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all())


def set_random_state(state: dict):
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    torch.cuda.set_rng_state_all(state["cuda"])


# Flags that a resumed run may give anew: they change where and how it runs and what it writes, not its numbers.
MAY_CHANGE_AT_RESUME = {"resume", "total_steps", "cuda", "compile", "track", "wandb_project_name", "wandb_entity",
                        "capture_video", "download_dataset", "log_every", "save_model", "checkpoint_every",
                        "eval_checkpoint", "eval_seed"}


def check_resume_flags(args: Args, checkpoint: dict):
    """A resumed run keeps its settings, except those of MAY_CHANGE_AT_RESUME; --total-steps must exceed its step."""
    for key, old in checkpoint["args"].items():
        if key not in MAY_CHANGE_AT_RESUME and getattr(args, key) != old:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} contradicts the checkpoint ({old}); a resumed run "
                 "keeps its own settings: drop the flag, or start a new run")
    if args.total_steps <= checkpoint["global_step"]:
        fail(f"--total-steps {args.total_steps} must exceed the checkpoint's step {checkpoint['global_step']}")


def restore_training(checkpoint: dict, saved: dict, path: str, nets, ema, optimizer) -> int:
    """--resume: check the data and device against `saved` (what this run's checkpoints record), restore every state
    the checkpoint holds, remove the temporary file a kill during a checkpoint write leaves, return the step."""
    if not all(np.array_equal(saved[key], checkpoint[key]) for key in ("state_knots", "action_knots", "returns_offset",
                                                                        "returns_scale")):
        fail(f"dataset {checkpoint['args']['dataset']} is not the data of the run (its normalisers or return scale "
             "differ from the checkpoint's); resume with the run's own data, or start a new run")
    if checkpoint["device"] != saved["device"]:
        fail(f"the run trained on {checkpoint['device']}, not {saved['device']}: resume it on its own device "
             "(--no-cuda for the cpu)")
    nets.load_state_dict(checkpoint["model"])
    ema.load_state_dict(checkpoint["ema_model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    set_random_state(checkpoint["random_state"])
    step = checkpoint["global_step"]
    checkpoint.clear()  # frees its copies of the weights (a large model's are GBs); the Adam moments are in use now
    for temporary in glob.glob(glob.escape(path) + ".tmp*"):
        os.remove(temporary)
    return step


def adopt_checkpoint_settings(args: Args, checkpoint: dict):
    """Evaluation-only mode: the checkpoint's architecture flags, episode seed, env, normalisers and references."""
    for key in "horizon n_diffusion_steps dim dim_mults kernel_size inv_hidden_dim normalizer cdf_knots".split():
        value = checkpoint["args"].get(key)
        setattr(args, key, tuple(value) if isinstance(value, list) else value)
    args.seed = args.eval_seed if args.eval_seed is not None else checkpoint["args"]["seed"]  # evaluate() uses it
    env_kwargs = None if args.env_id else checkpoint.get("env_kwargs")  # a Minari dataset's recorded evaluation env
    return (args.env_id or checkpoint["env_id"], env_kwargs, checkpoint["obs_dim"], checkpoint["act_dim"],
            Normalizer(checkpoint["state_knots"]), Normalizer(checkpoint["action_knots"]), checkpoint["returns_offset"],
            checkpoint["returns_scale"], checkpoint["ref_scores"])


def parse_args(argv=None) -> Args:
    """The command line. With --resume, flags not given take the checkpoint's values (main checks the given ones)."""
    args = tyro.cli(Args, args=argv)
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        args = tyro.cli(Args, args=argv, default=Args(**{**checkpoint["args"], "resume": args.resume}))
    return args


def fail(message: str):
    """Stop with a one-line error that names the fix (no traceback)."""
    raise SystemExit(f"{SCRIPT}.py: error: {message}")


if __name__ == "__main__":
    main(parse_args())
