"""Twin Delayed Deep Deterministic policy gradient (TD3) for continuous control, in one file.

Paper: S. Fujimoto, H. van Hoof, D. Meger, "Addressing Function Approximation Error in Actor-Critic Methods",
ICML 2018, arXiv:1802.09477.

Implements Algorithm 1 (`update` is one iteration of it): clipped double Q-learning (Section 4.2, Eq. (10)), target
policy smoothing (Section 5.3, Eqs. (14)-(15)), delayed policy and target updates every d = 2 critic updates (Section
5.2), the deterministic policy gradient through Q_theta1 (Eq. (1)), soft target updates, Gaussian exploration noise.
Defaults are the authors' current code (sfujim/TD3: 256-256 networks, Adam 3e-4, batch 256, 25k random start steps);
the paper's 400-300 networks, lr 1e-3 and batch 100 are flags. Leaves out the paper's ablations and "Our DDPG".
Checked against sfujim/TD3, Stable-Baselines3 `td3/` and CleanRL `td3_continuous_action.py`. Actor and critics act
in [-1, 1]^dim(A); each dimension's own [low, high] is applied only when stepping, so noise sigma in these units is
sigma (high - low) / 2 in the env's (sigma max_action on the symmetric MuJoCo tasks).

Commands:
    python td3_continuous.py --env-id Pendulum-v1 --total-timesteps 15000 --learning-starts 1000 --eval-every 5000
    python td3_continuous.py --env-id Hopper-v5 --save-model --export-minari local/hopper-td3-replay-v0
    python td3_continuous.py --eval-checkpoint runs/<run_name>/td3_continuous.pt --eval-episodes 10
"""

import contextlib
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT = "td3_continuous"
CHECKPOINT_VERSION = 4  # 4: exact resume (replay buffer, random generators, logging state); 3: --hidden-dims


@dataclass
class Args:
    # Experiment
    exp_name: str = SCRIPT
    """name of this experiment; part of the run name `{env_id}__{exp_name}__{seed}__{unix_time}`"""
    seed: int = 1
    """seed of python, numpy, torch and the environments (the evaluation env uses seed + 10000 + episode)"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic` (no effect on CPU, where runs are already deterministic)"""
    cuda: bool = True
    """train on CUDA when it is available"""
    compile: bool = False
    """compile the networks' forward passes with torch.compile (the first updates are slow while it compiles)"""
    track: bool = False
    """also log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "rl-reference"
    """the Weights & Biases project"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team); None means your default"""
    capture_video: bool = False
    """record the final evaluation episodes to `videos/{run_name}/` (needs `pip install moviepy`)"""

    # Environment
    env_id: str = "Hopper-v5"
    """any Gymnasium id with a bounded Box action space"""
    total_timesteps: int = 1_000_000
    """environment steps to train for (paper: 1M)"""

    # Algorithm. Deviation: the authors' code's settings, not the paper's experiments' (those are flags)
    buffer_size: int = 1_000_000
    """replay buffer capacity, in transitions (paper and code: 1e6)"""
    gamma: float = 0.99
    """discount factor (paper and code: 0.99)"""
    tau: float = 0.005
    """target smoothing coefficient: theta' <- tau theta + (1 - tau) theta' (paper and code: 0.005)"""
    batch_size: int = 256
    """minibatch size per gradient step (code: 256; paper: 100)"""
    learning_starts: int = 25_000
    """uniform-random steps before the first gradient step (code: 25e3; paper: 1e4 or 1e3 depending on the task)"""
    hidden_dims: tuple[int, int] = (256, 256)
    """widths of the 2 hidden ReLU layers of actor and critics (code: 256 256; paper, Table 3: 400 300)"""
    policy_lr: float = 3e-4
    """Adam learning rate of the actor (code: 3e-4; paper: 1e-3)"""
    q_lr: float = 3e-4
    """Adam learning rate of the critics (code: 3e-4; paper: 1e-3)"""
    policy_frequency: int = 2
    """d: update the actor and the target networks once every d critic updates (paper and code: 2)"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise, per dimension, in units of the half action range (paper and code: 0.1)"""
    policy_noise: float = 0.2
    """sigma~ of the target policy smoothing noise, in units of the half action range (paper and code: 0.2)"""
    noise_clip: float = 0.5
    """c: the target policy smoothing noise is clipped to [-c, c] (paper and code: 0.5)"""

    # Evaluation and logging
    eval_every: int = 5_000
    """evaluate the deterministic policy (no noise) every N environment steps (code: 5e3)"""
    eval_episodes: int = 10
    """episodes per evaluation (code: 10)"""
    log_every: int = 2_000
    """write losses to TensorBoard and print a progress line every N environment steps"""

    # Checkpoints and offline data
    save_model: bool = False
    """write `runs/{run_name}/td3_continuous.pt` (atomically; the replay buffer beside it in `replay/`) at the end
    and at the first episode end after every --checkpoint-every steps"""
    checkpoint_every: int | None = None
    """with --save-model, environment steps between checkpoints (default: --eval-every)"""
    eval_checkpoint: str | None = None
    """evaluation-only mode: load this checkpoint or released agent (benchmarks/agents/) and print the mean +- std
    return over --eval-episodes; with --export-rollouts*, then roll its policy out"""
    eval_seed: int | None = None
    """seed of --eval-checkpoint's episodes; default: the checkpoint's own seed, so the same start states as the
    run's own evaluations"""
    resume: str | None = None
    """continue the run of this checkpoint exactly, with its own settings (flags that contradict it fail);
    --total-timesteps may be raised to extend a finished run"""
    export_replay: str | None = None
    """write every transition collected in training to this .npz ("medium-replay" style, docs/datasets.md layout)"""
    export_minari: str | None = None
    """write every transition collected in training as a new Minari dataset with this id, e.g.
    local/hopper-td3-replay-v0 (into $MINARI_DATASETS_PATH, default ~/.minari/datasets; docs/datasets.md)"""
    export_rollouts: str | None = None
    """after training (or --eval-checkpoint), write rollouts of the policy to this .npz ("medium"/"expert" style)"""
    export_rollouts_minari: str | None = None
    """the same rollouts as a new Minari dataset with this id"""
    export_rollout_steps: int = 100_000
    """environment steps of final-policy rollouts for --export-rollouts (D4RL used 1e6)"""
    export_rollout_deterministic: bool = False
    """roll out the policy without exploration noise (by default the noise of --exploration-noise is kept)"""


# ======================================================================================================================
# The paper: replay buffer, twin critics, actor, noise, losses and one iteration of Algorithm 1
# ======================================================================================================================
class ReplayBuffer:
    """Replay buffer B: a ring of rows [s | a | r | terminated | s'] on the device (one copy to store, one gather to
    sample); actions in [-1, 1]. Truncation is not stored: a truncated step bootstraps like any other."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.capacity, self.obs_dim, self.act_dim, self.position, self.size = capacity, obs_dim, act_dim, 0, 0
        try:
            self.rows = torch.zeros((capacity, 2 * obs_dim + act_dim + 2), dtype=torch.float32, device=device)
        except (RuntimeError, MemoryError):
            fail(f"cannot allocate a replay buffer of {capacity} transitions on {device}; lower --buffer-size")

    def add(self, obs, action, reward, terminated, next_obs):
        row = np.concatenate([obs, action, [reward, float(terminated)], next_obs]).astype(np.float32)
        self.rows[self.position] = torch.from_numpy(row).to(self.rows.device, non_blocking=True)
        self.position = (self.position + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int):  # uniform: (obs, actions, rewards, terminations, next_obs)
        index = torch.randint(0, self.size, (batch_size,), device=self.rows.device)
        batch = self.rows.index_select(0, index)  # (B, 2 * obs_dim + act_dim + 2); cheaper than rows[index]
        return torch.split(batch, [self.obs_dim, self.act_dim, 1, 1, self.obs_dim], dim=1)


class TwinQNetwork(nn.Module):
    """Critics Q_theta1, Q_theta2: 2 hidden ReLU layers each, initialised like nn.Linear. Speed trick: weights stacked
    on a leading axis of 2, so one batched matmul per layer evaluates both critics (half the kernel launches)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, int], num_q: int = 2):
        super().__init__()

        def stacked_linear(fan_in: int, fan_out: int):  # weight (num_q, fan_in, fan_out), bias (num_q, 1, fan_out)
            bound = 1.0 / math.sqrt(fan_in)
            return (nn.Parameter(torch.empty(num_q, fan_in, fan_out).uniform_(-bound, bound)),
                    nn.Parameter(torch.empty(num_q, 1, fan_out).uniform_(-bound, bound)))

        self.w1, self.b1 = stacked_linear(obs_dim + act_dim, hidden_dims[0])
        self.w2, self.b2 = stacked_linear(hidden_dims[0], hidden_dims[1])
        self.w3, self.b3 = stacked_linear(hidden_dims[1], 1)

    def forward(self, obs, actions, detach_params: bool = False, first_only: bool = False) -> torch.Tensor:
        """(Q_1(s, a), Q_2(s, a)) as (2, B), or Q_1 alone (1, B); detach_params: gradients reach the actions only."""
        params = (self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)
        if first_only:  # slice the parameters, not the output: the backward skips Q_2
            params = tuple(param[:1] for param in params)
        if detach_params:
            params = tuple(param.detach() for param in params)
        w1, b1, w2, b2, w3, b3 = params
        x = torch.cat([obs, actions], dim=-1).expand(len(w1), -1, -1)  # (num_q, B, obs_dim + act_dim), no copy
        # bias + x @ weight for all critics at once; ReLU in place is safe (the matmul's backward needs its input)
        x = torch.baddbmm(b1, x, w1).relu_()  # (num_q, B, hidden_dims[0])
        x = torch.baddbmm(b2, x, w2).relu_()  # (num_q, B, hidden_dims[1])
        return torch.baddbmm(b3, x, w3).squeeze(-1)  # (num_q, B)


class Actor(nn.Module):
    """The deterministic policy pi_phi(s): 2 hidden ReLU layers and a tanh output in [-1, 1]^dim(A)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, int]):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(obs_dim, hidden_dims[0]), nn.Linear(hidden_dims[0], hidden_dims[1])
        self.fc3 = nn.Linear(hidden_dims[1], act_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.fc1(obs).relu_()).relu_()  # in place: a Linear's backward needs its input, not its output
        return torch.tanh(self.fc3(x))  # (B, act_dim)


def explore(actor: Actor, obs: torch.Tensor, noise_std: float) -> torch.Tensor:
    """Algorithm 1: a = pi_phi(s) + eps, eps ~ N(0, sigma) per dimension and row, clipped to [-1, 1]. Deviation:
    sfujim/TD3 scales every dimension's noise by high[0]; here each by its own half range (same on MuJoCo)."""
    action = actor(obs)
    return (action + noise_std * torch.randn_like(action)).clamp(-1.0, 1.0)


def smoothed_target_actions(actor_target: Actor, next_obs: torch.Tensor, policy_noise: float, noise_clip: float):
    """Eq. (15), the sampled form of Eq. (14): a~ = pi_phi'(s') + eps, eps ~ clip(N(0, sigma~), -c, c) per dimension,
    then clipped to the action bounds."""
    target_action = actor_target(next_obs)
    noise = (policy_noise * torch.randn_like(target_action)).clamp(-noise_clip, noise_clip)
    return (target_action + noise).clamp(-1.0, 1.0)


def critic_loss_fn(qf, obs, actions, target):
    """Algorithm 1: sum_i N^-1 sum (y - Q_theta_i(s, a))^2 (as sfujim/TD3, no 1/2); also per-critic losses, Q values."""
    q_values = qf(obs, actions)  # (2, B)
    qf_losses = (q_values - target).pow(2).mean(dim=1)  # (2,)
    return qf_losses.sum(), qf_losses.detach(), q_values.detach()


def actor_loss_fn(actor, qf, obs):
    """Eq. (1): grad_phi J = N^-1 sum grad_a Q_theta1(s, a)|a=pi_phi(s) grad_phi pi_phi(s), as the loss
    -Q_theta1(s, pi_phi(s)): the first critic only, its weights detached (the loss trains the actor only)."""
    return -qf(obs, actor(obs), detach_params=True, first_only=True).mean()


def clear_grads(optimizer: torch.optim.Optimizer):
    """Speed trick: optimizer.zero_grad(set_to_none=True) without its profiling and compiler wrappers, which cost a few
    percent of the updates per second with networks this small."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


def soft_update(target_params: list, online_params: list, tau: float):
    """Algorithm 1: theta' <- tau theta + (1 - tau) theta' (target.lerp_(online, tau)) for every tensor, in one call."""
    with torch.no_grad():
        torch._foreach_lerp_(target_params, online_params, tau)


def update(rb: ReplayBuffer, actor, actor_target, qf, qf_target, actor_optimizer, q_optimizer, args,
           update_actor: bool) -> dict[str, torch.Tensor]:
    """One iteration of Algorithm 1 after the env step, as sfujim/TD3's TD3.train(); `update_actor` is "t mod d = 0".
    Returns detached metric tensors (nothing here waits for the device)."""
    # Algorithm 1: sample a mini-batch of N transitions (s, a, r, s') from B
    obs, actions, rewards, terminations, next_obs = rb.sample(args.batch_size)
    with torch.no_grad():
        # Eq. (15): target policy smoothing, a~ = pi_phi'(s') + eps, eps ~ clip(N(0, sigma~), -c, c)
        next_actions = smoothed_target_actions(actor_target, next_obs, args.policy_noise, args.noise_clip)
        # Eq. (10): clipped double-Q target from the target critics, y = r + gamma (1 - d) min_i Q_theta'_i(s', a~);
        # d = 1 only at a termination (a time-limit truncation still bootstraps)
        next_q = qf_target(next_obs, next_actions).min(dim=0).values  # (B,)
        target = rewards.squeeze(-1) + args.gamma * (1.0 - terminations.squeeze(-1)) * next_q  # (B,)
    # Algorithm 1: update the critics, theta_i <- argmin_theta_i N^-1 sum (y - Q_theta_i(s, a))^2 (one Adam step)
    qf_loss, qf_losses, q_values = critic_loss_fn(qf, obs, actions, target)
    clear_grads(q_optimizer)
    qf_loss.backward()
    q_optimizer.step()
    metrics = {"qf_losses": qf_losses, "q_values": q_values.mean(dim=1)}
    if update_actor:  # Section 5.2: delayed policy updates, once every d critic updates
        # Eq. (1): update phi by the deterministic policy gradient through Q_theta1 (one Adam step)
        loss = actor_loss_fn(actor, qf, obs)
        clear_grads(actor_optimizer)
        loss.backward()
        actor_optimizer.step()
        # Algorithm 1: update the target networks, theta'_i <- tau theta_i + (1 - tau) theta'_i, phi' likewise
        soft_update([*qf_target.parameters(), *actor_target.parameters()], [*qf.parameters(), *actor.parameters()],
                    args.tau)
        metrics["actor_loss"] = loss.detach()
    return metrics


# ======================================================================================================================
# Main: set-up, the training loop, evaluation and logging
# ======================================================================================================================
def main(args: Args):
    validate_args(args)
    checkpoint = load_checkpoint(args.eval_checkpoint or args.resume) if (args.eval_checkpoint or args.resume) else None
    if checkpoint is not None:
        check_resume_flags(args, checkpoint) if args.resume else adopt_checkpoint_settings(args, checkpoint)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    # Flush denormal floats to zero on CPU: x86 arithmetic on them is very slow, and Adam's second moments of near-zero
    # gradients fall there. It sets this thread's floating-point mode, which threads started later inherit (torch's
    # intra-op pool starts at the first parallel kernel, after this line). Not in the paper; a no-op where unsupported.
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    run_name = (checkpoint["run_name"] if args.resume  # a resumed run goes on in its own folder
                else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")

    env = make_env(args.env_id, args.seed)
    eval_env = make_eval_env(args, run_name, record=bool(args.eval_checkpoint))
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high

    # Algorithm 1: initialise critics Q_theta1, Q_theta2 and actor pi_phi; targets theta'_i <- theta_i, phi' <- phi.
    actor = Actor(obs_dim, act_dim, args.hidden_dims).to(device)
    actor_target = Actor(obs_dim, act_dim, args.hidden_dims).to(device)
    qf = TwinQNetwork(obs_dim, act_dim, args.hidden_dims).to(device)
    qf_target = TwinQNetwork(obs_dim, act_dim, args.hidden_dims).to(device)
    actor_target.load_state_dict(actor.state_dict())
    qf_target.load_state_dict(qf.state_dict())
    actor_target.requires_grad_(False), qf_target.requires_grad_(False)
    fused = device.type in ("cpu", "cuda")  # one fused Adam kernel per optimiser instead of a loop over tensors
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=args.q_lr, fused=fused)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=fused)
    state = dict(actor=actor, actor_target=actor_target, qf=qf, qf_target=qf_target, q_optimizer=q_optimizer,
                 actor_optimizer=actor_optimizer)  # what a checkpoint holds
    start_step = restore(state, checkpoint, args) if checkpoint is not None else 0

    if args.eval_checkpoint:  # evaluation-only mode
        return evaluate_checkpoint(actor, eval_env, args, start_step, device)
    for network in (actor, actor_target, qf, qf_target) if args.compile else ():
        network.compile()  # torch.compile of the forward passes, in place (same parameter names in checkpoints)
    writer = make_writer(args, run_name, start_step)
    print(f"run {run_name}: {args.env_id}, obs {obs_dim}, actions {act_dim} in [{low.min():g}, {high.max():g}], "
          f"device {device}, {args.total_timesteps} steps" + (f", resumed at step {start_step}" if args.resume else ""))
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim, device)
    replay_log = TransitionLog(args.total_timesteps - start_step, obs_dim, act_dim) \
        if args.export_replay or args.export_minari else None
    metrics, recent_returns = resume_loop(checkpoint, args, rb, env) if args.resume else ({}, [])
    critic_updates = max(start_step - args.learning_starts, 0)  # one per step after the warm-up
    progress, saved_at = Progress(start_step, args.total_timesteps), start_step
    every = args.checkpoint_every or args.eval_every  # environment steps between checkpoints

    def run_evaluation(step):
        with progress.paused():  # evaluations do not count as training time
            returns = evaluate(actor, eval_env, args.eval_episodes, args.seed + 10_000, device)
            log_evaluation(writer, returns, step, args.env_id)
        return returns

    def write_checkpoint(step):  # everything exact resume needs (see save_checkpoint)
        with progress.paused():
            writer.flush()  # what was logged up to the checkpoint survives a kill
            save_checkpoint(f"runs/{run_name}/{SCRIPT}.pt", args, step, state, rb, env, run_name=run_name,
                            metrics=metrics, recent_returns=recent_returns)
        return step

    obs = None  # no episode in progress: reset before the next step
    for global_step in range(start_step, args.total_timesteps):
        if obs is None:
            obs, _ = env.reset(seed=args.seed if global_step == 0 else None)
        # Algorithm 1: select action with exploration noise a = pi(s) + eps (uniform random in the first steps)
        if global_step < args.learning_starts:
            action = (2.0 * (env.action_space.sample() - low) / (high - low) - 1.0).astype(np.float32)
        else:
            with torch.inference_mode():
                action = explore(actor, torch.as_tensor(obs, dtype=torch.float32, device=device)[None],
                                 args.exploration_noise)
            action = action[0].cpu().numpy()
        env_action = to_env_action(action, low, high)
        next_obs, reward, terminated, truncated, info = env.step(env_action)
        # Algorithm 1: store (s, a, r, s') in B; next_obs is the real final observation even at an episode end
        rb.add(obs, action, reward, terminated, next_obs)
        if replay_log is not None:
            replay_log.add(obs, env_action, reward, next_obs, terminated, truncated)
        step = global_step + 1
        if terminated or truncated:
            episode_return, episode_length = float(info["episode"]["r"]), int(info["episode"]["l"])
            writer.add_scalar("charts/episodic_return", episode_return, step)
            writer.add_scalar("charts/episodic_length", episode_length, step)
            recent_returns = (recent_returns + [episode_return])[-10:]
        obs = None if terminated or truncated else next_obs

        if global_step >= args.learning_starts:
            critic_updates += 1
            metrics.update(update(rb, actor, actor_target, qf, qf_target, actor_optimizer, q_optimizer, args,
                                  update_actor=critic_updates % args.policy_frequency == 0))
        if step % args.log_every == 0 or step == args.total_timesteps:
            log_progress(writer, progress, step, metrics, recent_returns, warming_up=step <= args.learning_starts)
        if step % args.eval_every == 0 and step != args.total_timesteps:
            run_evaluation(step)
        if args.save_model and obs is None and saved_at // every < step // every and step < args.total_timesteps:
            saved_at = write_checkpoint(step)  # between episodes: resuming from here continues this very run

    # Final evaluation (with video if asked), checkpoint and datasets; a failed export falls back to the run folder.
    if args.capture_video:
        eval_env.close()
        eval_env = make_eval_env(args, run_name, record=True)
    eval_returns = run_evaluation(args.total_timesteps)
    print(f"final evaluation: {describe_returns(eval_returns, reference_scores(args.env_id))}")
    if args.save_model:
        write_checkpoint(args.total_timesteps)
        print(f"saved checkpoint to runs/{run_name}/{SCRIPT}.pt")
    if replay_log is not None:
        source = f"{SCRIPT}.py training transitions, steps {start_step}-{args.total_timesteps}, seed {args.seed}"
        replay_log.save(args.export_replay, args.export_minari, args.env_id, source, f"runs/{run_name}")
    if args.export_rollouts or args.export_rollouts_minari:
        export_rollouts(actor, args, device, args.total_timesteps, f"runs/{run_name}")
    env.close()
    eval_env.close()
    close_writer(args, writer)
    return eval_returns


# ======================================================================================================================
# Not in the paper: argument checks, environments, data, checkpoints, logging and errors
# ======================================================================================================================
def validate_args(args: Args):
    """Reject nonsensical settings up front, with a one-line error."""
    for name in ["total_timesteps", "buffer_size", "batch_size", "hidden_dims", "policy_lr", "q_lr", "policy_frequency",
                 "eval_every", "eval_episodes", "log_every", "export_rollout_steps", "checkpoint_every"]:
        if getattr(args, name) is not None and min(np.atleast_1d(getattr(args, name))) <= 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ["learning_starts", "exploration_noise", "policy_noise", "noise_clip"]:
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.learning_starts >= args.total_timesteps:
        print(f"warning: --learning-starts ({args.learning_starts}) >= --total-timesteps ({args.total_timesteps}): "
              "every step is uniformly random, no gradient step is taken, the evaluations are of the untrained policy")
    for name in ["seed", "eval_seed"]:
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < 2**32 - 20_000:
            fail(f"--{name.replace('_', '-')} must be in [0, 2**32 - 20000) (evaluations use seed + 10000), "
                 f"got {getattr(args, name)}")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume (continue training) or --eval-checkpoint (evaluate only), not both")
    if not (0.0 < args.tau <= 1.0 and 0.0 <= args.gamma <= 1.0):
        fail(f"--tau must be in (0, 1] and --gamma in [0, 1], got {args.tau} and {args.gamma}")
    for flag, path in [("--export-replay", args.export_replay), ("--export-rollouts", args.export_rollouts)]:
        if path is not None:  # now, not after hours of training
            check_writable(path, flag)
    for flag, dataset_id in [("--export-minari", args.export_minari),
                             ("--export-rollouts-minari", args.export_rollouts_minari)]:
        if dataset_id is not None:
            check_minari_id(dataset_id, flag)
    if args.export_minari is not None and args.export_minari == args.export_rollouts_minari:
        fail("--export-minari and --export-rollouts-minari need two different dataset ids")
    if args.capture_video:
        try:
            import moviepy  # noqa: F401  (RecordVideo writes mp4 files with it)
        except ImportError:
            fail("--capture-video needs moviepy: pip install moviepy (MuJoCo on a headless machine: MUJOCO_GL=egl)")


# D4RL's random (0) and expert (100) returns for the normalised score (docs/datasets.md), measured on the v2 envs.
D4RL_REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
                   "walker2d": (1.629008, 4592.3), "ant": (-325.6, 3879.7)}


def reference_scores(env_id: str) -> tuple[float, float] | None:
    """(random, expert) returns for a D4RL locomotion task, e.g. "Hopper-v5" -> hopper's; None for other tasks."""
    return D4RL_REF_SCORES.get(env_id.split("-v")[0].lower())


def normalized_score(mean_return: float, refs: tuple[float, float] | None) -> float | None:
    """100 (R - R_random) / (R_expert - R_random), or None without references (docs/datasets.md)."""
    return None if refs is None else 100.0 * (mean_return - refs[0]) / (refs[1] - refs[0])


def describe_returns(returns: np.ndarray, refs: tuple[float, float] | None) -> str:
    text = f"{returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes"
    score = normalized_score(returns.mean(), refs)
    return text if score is None else f"{text} (normalized score {score:.1f}, D4RL v2 references)"


def make_env(env_id: str, seed: int, video_dir: str | None = None) -> gym.Env:
    """One checked Gymnasium env (not a vector env: `next_obs` at an episode end is the real final observation)."""
    try:
        env = gym.make(env_id, render_mode="rgb_array" if video_dir else None)
    except gym.error.DependencyNotInstalled as error:
        fail(f"{env_id} needs a package that is missing ({error}); pip install -r requirements.txt")
    except gym.error.Error as error:
        fail(f"cannot make environment '{env_id}' ({error}); pass --env-id with a registered id such as Hopper-v5")
    except Exception as error:  # e.g. MUJOCO_GL naming a rendering backend that is not installed
        fail(f"cannot make environment '{env_id}' ({type(error).__name__}: {str(error).partition(chr(10))[0]}); "
             "if MUJOCO_GL is set, check that its backend (egl or osmesa) is installed")
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        fail(f"{env_id} has a {type(space).__name__} action space; TD3 needs a continuous Box action space "
             "(use a discrete-action method such as DQN, or pick a continuous env such as Pendulum-v1)")
    if len(space.shape) != 1 or not np.all(np.isfinite(space.low) & np.isfinite(space.high) & (space.low < space.high)):
        fail(f"{env_id} has actions {space}; TD3 here needs a flat Box with finite low < high in every dimension "
             "(wrap it in gymnasium.wrappers.FlattenObservation / RescaleAction)")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        fail(f"{env_id} has {env.observation_space} observations; TD3 here needs a flat Box "
             "(wrap it in gymnasium.wrappers.FlattenObservation)")
    env = gym.wrappers.RecordEpisodeStatistics(env)
    if video_dir:
        try:  # one frame now, so a broken rendering set-up fails before training, not after it
            env.reset(seed=seed)
            env.render()
        except Exception as error:
            fail(f"cannot render {env_id} for --capture-video ({type(error).__name__}); on a headless machine "
                 "set MUJOCO_GL=egl (or osmesa, with its libraries installed)")
        env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda episode: True, disable_logger=True)
    env.action_space.seed(seed)
    return env


def make_eval_env(args, run_name: str, record: bool) -> gym.Env:
    """The evaluation env, seeded apart from training's. --capture-video records only when `record` (the final or
    the evaluation-only evaluation); otherwise it checks now that rendering works."""
    video_dir = f"videos/{run_name}" if args.capture_video else None
    if video_dir and not record:
        make_env(args.env_id, args.seed + 10_000, video_dir).close()
    return make_env(args.env_id, args.seed + 10_000, video_dir if record else None)


def to_env_action(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map a policy action in [-1, 1] to the env's own bounds, per dimension: low + (a + 1) (high - low) / 2."""
    return low + 0.5 * (action + 1.0) * (high - low)


@torch.inference_mode()
def evaluate(actor: Actor, env: gym.Env, episodes: int, seed: int, device: torch.device) -> np.ndarray:
    """Returns of `episodes` episodes of the deterministic policy pi(s), without exploration noise. Episode i resets
    with seed + i, so every evaluation (in training, or later from a checkpoint) starts from the same initial states."""
    low, high = env.action_space.low, env.action_space.high
    returns = np.zeros(episodes)
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            action = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
            obs, reward, terminated, truncated, _ = env.step(to_env_action(action[0].cpu().numpy(), low, high))
            returns[episode] += reward
            done = terminated or truncated
    return returns


def evaluate_checkpoint(actor: Actor, eval_env: gym.Env, args: Args, step: int, device: torch.device) -> np.ndarray:
    """Evaluation-only mode: print and return the loaded policy's returns over --eval-episodes episodes."""
    returns = evaluate(actor, eval_env, args.eval_episodes, args.seed + 10_000, device)
    print(f"evaluation of {args.eval_checkpoint} (step {step}, seed {args.seed}) on {args.env_id}: "
          f"{describe_returns(returns, reference_scores(args.env_id))}")
    eval_env.close()
    if args.export_rollouts or args.export_rollouts_minari:  # D4RL-style data from a saved or released policy
        export_rollouts(actor, args, device, step, os.path.dirname(os.path.abspath(args.eval_checkpoint)))
    return returns


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------
# Exact resume: a checkpoint is written between episodes (or at the end of the run), so it needs no environment
# state but the random generators. It holds the state dicts of the networks and optimisers, the random
# generators (python, numpy, torch and CUDA, the training env's and its action space's), the logging state (the last
# metrics and recent returns) and the list of the replay buffer's chunk files: each checkpoint writes only the rows
# added since the previous one, as `replay/{first}-{end}.pt` beside the checkpoint. Writes are atomic, chunks before
# the checkpoint that lists them: a kill at any moment leaves the previous checkpoint and its chunks loadable.
MAY_CHANGE_AT_RESUME = {"resume", "total_timesteps", "cuda", "compile", "track", "wandb_project_name", "wandb_entity",
                        "capture_video", "save_model", "checkpoint_every", "log_every", "eval_checkpoint", "eval_seed",
                        "export_replay", "export_minari", "export_rollouts", "export_rollouts_minari",
                        "export_rollout_steps", "export_rollout_deterministic"}


def save_checkpoint(path: str, args: Args, step: int, state: dict, rb: ReplayBuffer, env: gym.Env, **extra):
    """Write the state dicts of `state` (networks and optimisers), the replay buffer's new rows, the random
    generators and `extra` (run name, logging state), atomically."""
    checkpoint = dict(script=SCRIPT, version=CHECKPOINT_VERSION, args=asdict(args), global_step=step, **extra,
                      replay=save_replay(rb, os.path.join(os.path.dirname(path), "replay"), step),
                      random=dict(random_state(), env=env.unwrapped.np_random.bit_generator.state,
                                  action_space=env.action_space.np_random.bit_generator.state),
                      **{name: module.state_dict() for name, module in state.items()})
    atomic_write(path, lambda file: torch.save(checkpoint, file))
    for name in set(os.listdir(os.path.join(os.path.dirname(path), "replay"))) - set(checkpoint["replay"]):
        os.remove(os.path.join(os.path.dirname(path), "replay", name))  # overwritten rows, or a temporary file


def replay_chunks(folder: str) -> list:
    """The chunk files `{first}-{end}.pt` in `folder` as (first, end, name), oldest first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((*chunk_span(name), name) for name in names if re.fullmatch(r"\d+-\d+\.pt", name))


def chunk_span(name: str) -> tuple[int, int]:
    """The transitions [first, end) that the chunk file `{first}-{end}.pt` holds."""
    first, end = name.removesuffix(".pt").split("-")
    return int(first), int(end)


def save_replay(rb: ReplayBuffer, folder: str, count: int) -> list:
    """Write the rows added since the last chunk (transitions [first, count), at ring positions t % capacity) as
    `folder/{first}-{count}.pt`; return the chunk files that hold the buffer, oldest first."""
    os.makedirs(folder, exist_ok=True)
    chunks = replay_chunks(folder)
    first = max(chunks[-1][1] if chunks else 0, count - rb.capacity)
    if first < count:
        rows = rb.rows[torch.arange(first, count, device=rb.rows.device) % rb.capacity].cpu()
        atomic_write(os.path.join(folder, f"{first}-{count}.pt"), lambda file: torch.save(rows, file))
        chunks.append((first, count, f"{first}-{count}.pt"))
    return [name for _, end, name in chunks if end > count - rb.capacity]  # older rows were overwritten


def load_replay(rb: ReplayBuffer, checkpoint: dict, source: str, folder: str):
    """Refill the buffer from the checkpoint's chunks in `source`, each row at its ring position; make `folder` (the
    run's own) hold exactly those chunks, so the next checkpoint adds to them."""
    os.makedirs(folder, exist_ok=True)
    for name in checkpoint["replay"]:
        first, end = chunk_span(name)
        try:
            rows = torch.load(os.path.join(source, name), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:
            fail(f"cannot read the replay buffer's {os.path.join(source, name)} ({type(error).__name__}); a "
                 "checkpoint needs its replay/ folder beside it")
        rb.rows[torch.arange(first, end, device=rb.rows.device) % rb.capacity] = rows.to(rb.rows.device)
        if not os.path.exists(os.path.join(folder, name)):
            atomic_write(os.path.join(folder, name), lambda file: torch.save(rows, file))
    for _, _, name in replay_chunks(folder):
        if name not in checkpoint["replay"]:  # written by the interrupted run after its last checkpoint
            os.remove(os.path.join(folder, name))
    count = checkpoint["global_step"]
    rb.position, rb.size = count % rb.capacity, min(count, rb.capacity)


def random_state() -> dict:
    """The global random generators: python, numpy, torch and CUDA's (as types torch.load(weights_only=True) reads)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_random_state(state: dict):
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str) -> dict:
    """Load with weights_only=True and check it is one of ours; every failure is a one-line error."""
    if not os.path.isfile(path):
        fail(f"checkpoint '{path}' does not exist; train with --save-model to write runs/<run_name>/{SCRIPT}.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"cannot read checkpoint '{path}' ({type(error).__name__}); it is corrupt or not a torch file: "
             "re-create it with --save-model")
    script = checkpoint.get("script") if isinstance(checkpoint, dict) else None
    if script != SCRIPT:
        fail(f"checkpoint '{path}' was written by {script or 'another program'}, not {SCRIPT}.py; "
             f"load it with {script + '.py' if script else 'the script that wrote it'}")
    if checkpoint.get("version") != CHECKPOINT_VERSION or "hidden_dims" not in (checkpoint.get("args") or {}):
        fail(f"checkpoint '{path}' has format version {checkpoint.get('version')}, this script reads version "
             f"{CHECKPOINT_VERSION}; re-create it with this script's --save-model")
    return checkpoint


def adopt_checkpoint_settings(args: Args, checkpoint: dict):
    """Evaluation-only mode: the checkpoint decides the env and the network shapes, and its seed (the same start
    states as the run's own evaluations) unless --eval-seed is given."""
    saved = checkpoint["args"]
    for key, value in [("env_id", saved["env_id"]), ("hidden_dims", tuple(saved["hidden_dims"]))]:
        if getattr(args, key) != value:
            print(f"note: --{key.replace('_', '-')} {value} from the checkpoint")
        setattr(args, key, value)
    args.seed = args.eval_seed if args.eval_seed is not None else saved["seed"]


def parse_args(argv=None) -> Args:
    """The command line. With --resume, the flags not given take the checkpoint's values, not the defaults."""
    args = tyro.cli(Args, args=argv)
    if args.resume:
        saved = load_checkpoint(args.resume)["args"]
        args = tyro.cli(Args, args=argv, default=Args(**{**saved, "resume": args.resume}))
    return args


def check_resume_flags(args: Args, checkpoint: dict):
    """A resumed run keeps its settings: every flag outside MAY_CHANGE_AT_RESUME must equal the checkpoint's."""
    for key, saved in checkpoint["args"].items():
        if key not in MAY_CHANGE_AT_RESUME and getattr(args, key) != saved:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)} contradicts the checkpoint ({saved}); a resumed run "
                 "keeps its own settings: drop the flag, or start a new run")
    if args.total_timesteps <= checkpoint["global_step"]:
        fail(f"--total-timesteps ({args.total_timesteps}) must exceed the checkpoint's step "
             f"({checkpoint['global_step']}) to resume training")


def resume_loop(checkpoint: dict, args: Args, rb: ReplayBuffer, env: gym.Env) -> tuple[dict, list]:
    """Put the training loop where the checkpoint left it: replay buffer, random generators (global, the env's and
    its action space's); returns the logging state (last metrics, recent returns)."""
    load_replay(rb, checkpoint, os.path.join(os.path.dirname(args.resume), "replay"),
                os.path.join("runs", checkpoint["run_name"], "replay"))
    set_random_state(checkpoint["random"])
    env.unwrapped.np_random.bit_generator.state = checkpoint["random"]["env"]
    env.action_space.np_random.bit_generator.state = checkpoint["random"]["action_space"]
    return {key: value.to(rb.rows.device) for key, value in checkpoint["metrics"].items()}, checkpoint["recent_returns"]


def restore(state: dict, checkpoint: dict, args: Args) -> int:
    """Load networks, targets and optimizer states in place and return the step; evaluation-only mode needs the policy
    alone, so a released agent (benchmarks/agents/: the actor of a checkpoint) loads too."""
    if args.resume and "qf" not in checkpoint:
        fail(f"'{args.resume}' holds a policy only (a released agent): evaluate it with --eval-checkpoint")
    try:
        for name in state if args.resume else ["actor"]:
            state[name].load_state_dict(checkpoint[name])
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        fail(f"checkpoint '{args.eval_checkpoint or args.resume}' does not match {args.env_id} "
             f"({type(error).__name__}: {error}); re-create it with --save-model".replace("\n", " "))
    return int(checkpoint["global_step"])


# ----------------------------------------------------------------------------------------------------------------------
# Offline data in the docs/datasets.md layout, files, logging and errors
# ----------------------------------------------------------------------------------------------------------------------
class TransitionLog:
    """Host-side record of transitions (actions in env units, real final observations) for an .npz file."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.arrays = dict(observations=np.zeros((capacity, obs_dim), np.float32),
                           actions=np.zeros((capacity, act_dim), np.float32), rewards=np.zeros(capacity, np.float32),
                           next_observations=np.zeros((capacity, obs_dim), np.float32),
                           terminals=np.zeros(capacity, bool), timeouts=np.zeros(capacity, bool))
        self.size = 0

    def add(self, obs, env_action, reward, next_obs, terminated, truncated):
        timeout = truncated and not terminated  # a step that is both is terminal: timeouts mark non-terminal ends
        for key, value in zip(self.arrays, (obs, env_action, reward, next_obs, terminated, timeout)):
            self.arrays[key][self.size] = value
        self.size += 1

    def save(self, path: str | None, minari_id: str | None, env_id: str, source: str, fallback_folder: str):
        """Write the .npz `path` and/or the Minari dataset `minari_id`; whatever fails this late is written to
        `fallback_folder` instead, so collected data is never lost. An episode still running when collection stopped
        keeps neither flag at its last row: the marker of an unfinished episode."""
        data = {key: value[: self.size] for key, value in self.arrays.items()}
        if path is not None:
            arrays = dict(data, env_id=np.array(env_id), source=np.array(source))
            if reference_scores(env_id) is not None:
                arrays.update(ref_min_score=np.array(reference_scores(env_id)[0]),
                              ref_max_score=np.array(reference_scores(env_id)[1]))
            written = write_with_fallback(path, lambda file: np.savez(file, **arrays), fallback_folder)
            print(f"wrote {self.size} transitions to {written}")
        if minari_id is not None:
            try:
                folder = write_minari(minari_id, data, env_id, source)
                print(f"wrote {self.size} transitions to Minari dataset {minari_id} ({folder})")
            except Exception as error:  # disk full, the id taken meanwhile, ...: keep the data as an .npz instead
                fallback = os.path.join(fallback_folder, minari_id.replace("/", "_") + ".npz")
                print(f"warning: cannot write Minari dataset {minari_id} ({type(error).__name__}: {error}); "
                      f"writing {fallback} instead")
                self.save(fallback, None, env_id, source, fallback_folder)


@torch.inference_mode()
def export_rollouts(actor: Actor, args: Args, device: torch.device, step: int, fallback_folder: str):
    """Roll out the final (or loaded) policy for --export-rollout-steps steps on a freshly seeded env and save them."""
    env = make_env(args.env_id, args.seed + 20_000)
    log = TransitionLog(args.export_rollout_steps, env.observation_space.shape[0], env.action_space.shape[0])
    noise = 0.0 if args.export_rollout_deterministic else args.exploration_noise
    obs, _ = env.reset(seed=args.seed + 20_000)
    for _ in range(args.export_rollout_steps):
        action = explore(actor, torch.as_tensor(obs, dtype=torch.float32, device=device)[None], noise)
        env_action = to_env_action(action[0].cpu().numpy(), env.action_space.low, env.action_space.high)
        next_obs, reward, terminated, truncated, _ = env.step(env_action)
        log.add(obs, env_action, reward, next_obs, terminated, truncated)
        obs = env.reset()[0] if terminated or truncated else next_obs
    policy = "no" if args.export_rollout_deterministic else f"N(0, {args.exploration_noise}) exploration"
    log.save(args.export_rollouts, args.export_rollouts_minari, args.env_id,
             f"{SCRIPT}.py rollouts of the final policy with {policy} noise after {step} training steps, "
             f"seed {args.seed}", fallback_folder)


def write_minari(dataset_id: str, data: dict, env_id: str, source: str) -> str:
    """Write transitions in the docs/datasets.md layout as a Minari dataset, with Minari's own API: episodes of N + 1
    observations, terminations and truncations kept apart, an unfinished last episode stored as truncated (as
    Minari's DataCollector does). Built in a staging folder beside the datasets, then renamed into place, so a crash
    leaves no half-written dataset. Returns the dataset's folder."""
    import minari
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.namespace import create_namespace, list_local_namespaces
    from minari.storage import get_dataset_path

    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    if len(ends) == 0 or ends[-1] != len(data["rewards"]):
        ends = np.append(ends, len(data["rewards"]))
    episodes = []
    for start, end in zip(np.r_[0, ends[:-1]], ends):
        truncations = data["timeouts"][start:end].copy()
        truncations[-1] |= not data["terminals"][end - 1]
        episodes.append(EpisodeBuffer(
            observations=np.concatenate([data["observations"][start:end], data["next_observations"][end - 1:end]]),
            actions=data["actions"][start:end], rewards=data["rewards"][start:end],
            terminations=data["terminals"][start:end], truncations=truncations))
    refs = reference_scores(env_id) or (None, None)
    root, target = get_dataset_path(), get_dataset_path(dataset_id)
    staging, saved_root = tempfile.mkdtemp(prefix=".staging-", dir=root), os.environ.get("MINARI_DATASETS_PATH")
    try:
        os.environ["MINARI_DATASETS_PATH"] = staging
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`author")  # no author is known to the script
            minari.create_dataset_from_buffers(
                dataset_id, episodes, env=env_id, eval_env=env_id, algorithm_name=f"TD3 ({SCRIPT}.py)",
                code_permalink=f"{SCRIPT}.py at git commit {code_version()}", ref_min_score=refs[0],
                ref_max_score=refs[1], description=f"{source}. Episodes end at a termination or a truncation; one "
                "still running when collection stopped is stored as truncated.")
        for folder, _, files in os.walk(staging):
            for name in files:
                with open(os.path.join(folder, name), "rb") as file:
                    os.fsync(file.fileno())
        os.environ["MINARI_DATASETS_PATH"] = str(root)
        namespace = parse_dataset_id(dataset_id)[0]
        if namespace is not None and namespace not in list_local_namespaces():
            create_namespace(namespace)
        os.replace(os.path.join(staging, dataset_id), target)
    finally:
        if saved_root is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = saved_root
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def check_minari_id(dataset_id: str, flag: str):
    """Fail now, not after training: minari missing, a malformed id, an id already taken, an unwritable folder."""
    try:
        import minari  # noqa: F401
        from minari.dataset.minari_dataset import parse_dataset_id
        from minari.storage import get_dataset_path
    except ImportError:
        fail(f"{flag} needs minari: pip install minari")
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):  # minari 0.5 raises TypeError for an id without -vN
        fail(f"{flag} {dataset_id}: not a Minari dataset id; use namespace/name-vN, e.g. local/hopper-sac-replay-v0")
    try:
        if os.path.exists(get_dataset_path(dataset_id)):
            fail(f"{flag} {dataset_id}: that Minari dataset already exists in {get_dataset_path()}; choose another id "
                 f"or version, or delete it with `minari delete {dataset_id}`")
        os.rmdir(tempfile.mkdtemp(dir=get_dataset_path()))
    except OSError as error:
        fail(f"{flag} {dataset_id}: cannot write Minari datasets ({error.strerror}); set MINARI_DATASETS_PATH to a "
             "writable folder")


def code_version() -> str:
    """This file's git commit (with -dirty for uncommitted changes), for the metadata of exported datasets."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, check=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not in a git checkout)"


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


def check_writable(path: str, flag: str):
    """Create and remove a real file in the target folder now, so an unwritable path fails before training."""
    probe = f"{path}.probe{os.getpid()}"
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "is a folder")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as error:
        fail(f"{flag} {path}: cannot write there ({error.strerror}); give a writable file path such as data/run.npz")


def write_with_fallback(path: str, write, fallback_folder: str) -> str:
    """atomic_write to `path`; if that fails this late (disk full, folder removed), write to `fallback_folder`
    instead and say where, so collected data is never lost. Returns the path written."""
    try:
        atomic_write(path, write)
        return path
    except OSError as error:
        fallback = os.path.join(fallback_folder, os.path.basename(path) or "data.npz")
        print(f"warning: cannot write {path} ({error.strerror}); writing {fallback} instead")
        atomic_write(fallback, write)
        return fallback


def make_writer(args, run_name: str, start_step: int = 0) -> SummaryWriter:
    """TensorBoard writer for runs/{run_name}. A resumed run writes into the same folder: TensorBoard drops what the
    interrupted run logged after the checkpoint (purge_step). With --track, Weights & Biases starts first: its
    sync_tensorboard patch only sees writers created after wandb.init."""
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs Weights & Biases: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=run_name, save_code=True)
    writer = SummaryWriter(f"runs/{run_name}", purge_step=start_step + 1 if start_step else None)
    table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def close_writer(args, writer: SummaryWriter):
    writer.close()
    if args.track:
        import wandb

        wandb.finish()


def log_progress(writer, progress, step: int, metrics: dict, recent_returns: list, warming_up: bool):
    """Write the latest losses and the speed to TensorBoard and print a progress line: the loop's only host syncs."""
    if metrics:
        (qf1_loss, qf2_loss), (qf1_value, qf2_value) = metrics["qf_losses"].tolist(), metrics["q_values"].tolist()
        scalars = {"qf1_loss": qf1_loss, "qf2_loss": qf2_loss, "qf_loss": qf1_loss + qf2_loss, "qf1_values": qf1_value,
                   "qf2_values": qf2_value}
        if "actor_loss" in metrics:
            scalars["actor_loss"] = metrics["actor_loss"].item()
        for tag, value in scalars.items():
            writer.add_scalar(f"losses/{tag}", value, step)
    sps, eta = progress.tick(step, warming_up)
    writer.add_scalar("charts/SPS", sps, step)
    recent = f"{np.mean(recent_returns):.1f}" if recent_returns else "n/a"
    print(f"step {step}/{progress.total} | {sps:.0f} SPS | ETA {eta} | recent return {recent}", flush=True)


def log_evaluation(writer: SummaryWriter, returns: np.ndarray, step: int, env_id: str):
    writer.add_scalar("eval/episodic_return", returns.mean(), step)
    score = normalized_score(returns.mean(), reference_scores(env_id))
    if score is not None:
        writer.add_scalar("eval/normalized_score", score, step)
    print(f"eval at step {step}: {describe_returns(returns, reference_scores(env_id))}")


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


def fail(message: str):
    """Stop with a one-line error that names the fix (no traceback)."""
    raise SystemExit(f"{SCRIPT}.py: error: {message}")


if __name__ == "__main__":
    main(parse_args())
