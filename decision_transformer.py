"""Decision Transformer (DT) for offline RL, in one file.

Paper: L. Chen, K. Lu, A. Rajeswaran, K. Lee, A. Grover, M. Laskin, P. Abbeel, A. Srinivas, I. Mordatch,
"Decision Transformer: Reinforcement Learning via Sequence Modeling", arXiv:2106.01345 (2021).

What this file implements, in the paper's terms (Section 3 and Algorithm 1): trajectories as sequences
(R_1, s_1, a_1, R_2, s_2, a_2, ...) of undiscounted returns-to-go R_t = sum_{t' >= t} r_t', states and actions; a linear
embedding per modality plus a learned timestep embedding; a causal GPT that predicts a_t from the s_t token; MSE on
actions, one optimiser step per batch of K-step windows (`train_step`); evaluation conditioned on a target return R_1,
with R_{t+1} = R_t - r_t after each step. Defaults: the official gym settings (kzl/decision-transformer,
gym/experiment.py). What it leaves out: the Atari experiments; the state and return heads the official code defines
but never trains.
Resume: `--resume` continues a stopped run from its last checkpoint exactly as if it had never stopped; a higher
--total-steps extends a finished run and changes nothing else (the warm-up counts steps).
Checked against: kzl/decision-transformer (gym/), CORL `algorithms/offline/dt.py`. Departures: `# Deviation:`.

Commands:
    python sac_continuous.py --env-id HalfCheetah-v5 --total-timesteps 100000 --export-replay data/hc_replay.npz
    python decision_transformer.py --dataset data/hc_replay.npz
    python decision_transformer.py --dataset mujoco/hopper/medium-v0 --download-dataset
    python decision_transformer.py --eval-checkpoint runs/<run_name>/decision_transformer.pt --target-returns 3600
    python decision_transformer.py --resume runs/<run_name>/decision_transformer.pt --total-steps 200000
"""

import contextlib
import glob
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT = "decision_transformer"
CHECKPOINT_VERSION = 3
OFFICIAL_TARGET_RETURNS = {"hopper": [3600.0, 1800.0], "halfcheetah": [12000.0, 6000.0], "walker2d": [5000.0, 2500.0]}


@dataclass
class Args:
    # Experiment
    exp_name: str = SCRIPT
    """name of this experiment; part of the run name `{env_id}__{exp_name}__{seed}__{unix_time}`"""
    seed: int = 1
    """seed of python, numpy, torch and batch sampling (evaluation episode i resets with seed + 10000 + i)"""
    torch_deterministic: bool = True
    """set `torch.backends.cudnn.deterministic` (no effect on CPU, where runs are already deterministic)"""
    cuda: bool = True
    """train on CUDA when it is available"""
    compile: bool = False
    """wrap the training loss with torch.compile (the first steps are slow while it compiles)"""
    track: bool = False
    """also log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "rl-reference"
    """the Weights & Biases project"""
    wandb_entity: str | None = None
    """the Weights & Biases entity (team); None means your default"""
    capture_video: bool = False
    """record the final evaluation to `videos/{run_name}/`, the first episode of each target return (needs
    `pip install moviepy`)"""
    # Data and environment
    dataset: str | None = None
    """an .npz in the docs/datasets.md layout, a D4RL .hdf5 file, or a Minari id such as mujoco/hopper/medium-v0"""
    download_dataset: bool = False
    """let Minari download a dataset id that is not on this machine (needs internet and `pip install "minari[hf]"`)"""
    env_id: str | None = None
    """evaluation environment; None means the dataset's own (for a Minari id: its recorded evaluation env)"""
    # Model (defaults: the official gym experiments)
    context_len: int = 20
    """K, timesteps per training window (3K tokens)"""
    embed_dim: int = 128
    """width of every token embedding and of the transformer"""
    n_layers: int = 3
    """transformer blocks"""
    n_heads: int = 1
    """attention heads per block"""
    dropout: float = 0.1
    """dropout on attention weights and residual branches, and (deviation) on the embeddings, which the official code
    leaves at GPT-2's 0.1 whatever its --dropout (the same at the default 0.1)"""
    max_ep_len: int = 1000
    """size of the learned timestep embedding; at least the longest episode (data or evaluation env's time limit)"""
    # Optimisation (defaults: the official gym experiments)
    batch_size: int = 64
    """windows per gradient step"""
    learning_rate: float = 1e-4
    """AdamW learning rate after warm-up"""
    weight_decay: float = 1e-4
    """AdamW weight decay (on every parameter, as in the official code)"""
    warmup_steps: int = 10_000
    """the learning rate grows linearly from lr/warmup_steps to lr over this many steps, then stays constant"""
    grad_clip: float = 0.25
    """clip the global gradient norm to this value"""
    total_steps: int = 100_000
    """gradient steps (official: 10 iterations of 10k)"""
    reward_scale: float = 1000.0
    """returns-to-go are divided by this before they enter the model (official: 1000)"""
    # Evaluation and logging
    target_returns: list[float] | None = None
    """returns to condition on, each evaluated separately; None: the official ones (hopper 3600 1800, halfcheetah
    12000 6000, walker2d 5000 2500), else the dataset's best episode return and the midpoint of its mean and best"""
    eval_every: int = 10_000
    """evaluate every N gradient steps (official: after each iteration of 10k)"""
    eval_episodes: int = 100
    """episodes per target return, run in parallel in one vector env (official: 100)"""
    log_every: int = 1_000
    """write losses to TensorBoard and print a progress line every N gradient steps"""
    # Checkpoints
    save_model: bool = False
    """write `runs/{run_name}/decision_transformer.pt` atomically (all --resume needs) at evaluations and the end"""
    checkpoint_every: int | None = None
    """with --save-model, also write the checkpoint every N gradient steps; None: at evaluations and the end only"""
    resume: str | None = None
    """continue the run of this checkpoint, in its own run folder, exactly as if it had never stopped: flags not given
    keep the run's values; a different --total-steps (above the checkpoint's step; the warm-up counts steps, so
    extending a finished run changes nothing else), device, logging or checkpoint flags are allowed, others fail"""
    eval_checkpoint: str | None = None
    """evaluation-only mode: load this checkpoint (no dataset needed) and print mean +- std per target return"""
    eval_seed: int | None = None
    """seed of --eval-checkpoint's episodes; default: the checkpoint's own seed, so the same start states as the
    run's own evaluations"""


# ======================================================================================================================
# The paper: returns-to-go and (R, s, a) windows, the causal GPT, the action loss, one training step, evaluation
# ======================================================================================================================
# --- Trajectory representation (Section 3) ----------------------------------------------------------------------------
def episode_bounds(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) row of every episode; an episode ends at a row where terminals | timeouts."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    return np.concatenate([[0], ends[:-1]]), ends


def returns_to_go(rewards: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """R_t = sum_{t'=t}^{T} r_t' within each episode (Section 3: undiscounted; reset at episode boundaries)."""
    rtg = np.zeros_like(rewards, dtype=np.float64)
    for start, end in zip(starts, ends):
        rtg[start:end] = np.cumsum(rewards[start:end][::-1], dtype=np.float64)[::-1]
    return rtg.astype(np.float32)


class SequenceBuffer:
    """The dataset on the device as flat tensors; a batch of K-step windows is one gather. Official sampling picks an
    episode with probability proportional to its length, then a uniform start inside it: together a uniform draw over
    all N rows, which is what `sample` does. A window that runs past its episode's end is padded on the right."""

    def __init__(self, data: dict, state_mean: np.ndarray, state_std: np.ndarray, reward_scale: float,
                 max_ep_len: int, device: torch.device):
        starts, ends = episode_bounds(data)
        lengths = ends - starts
        if lengths.max() > max_ep_len:
            fail(f"the dataset has an episode of {lengths.max()} steps; raise --max-ep-len to at least {lengths.max()}")
        episode_of_row = np.repeat(np.arange(len(starts)), lengths)
        as_tensor = lambda array, dtype=torch.float32: torch.as_tensor(array, dtype=dtype, device=device)  # noqa: E731
        self.states = as_tensor((data["observations"] - state_mean) / state_std)  # (N, obs_dim), normalised
        self.actions = as_tensor(data["actions"])  # (N, act_dim)
        self.returns_to_go = as_tensor(returns_to_go(data["rewards"], starts, ends) / reward_scale)  # (N,)
        self.timesteps = as_tensor(np.arange(len(episode_of_row)) - starts[episode_of_row], torch.long)  # (N,)
        self.episode_end = as_tensor(ends[episode_of_row], torch.long)  # (N,) end row of each row's episode
        self.size = len(episode_of_row)

    def sample(self, batch_size: int, context_len: int, generator: torch.Generator):
        """(states (B, K, obs_dim), actions (B, K, act_dim), returns_to_go (B, K, 1), timesteps (B, K), mask (B, K))"""
        first = torch.randint(0, self.size, (batch_size,), device=self.states.device, generator=generator)  # (B,)
        rows = first[:, None] + torch.arange(context_len, device=self.states.device)  # (B, K)
        # Deviation: right padding (the official code pads on the left, with different pad values in training and
        # evaluation); under the causal mask no real token can see a pad, so pad values cannot matter.
        mask = rows < self.episode_end[first][:, None]  # (B, K) True on real steps, False on right padding
        rows = torch.where(mask, rows, first[:, None])  # pads repeat the window's first row (any valid row does)
        return self.states[rows], self.actions[rows], self.returns_to_go[rows][..., None], self.timesteps[rows], mask


# --- Architecture (Section 3): a GPT-style causal transformer over (R_t, s_t, a_t) tokens -----------------------------
class Block(nn.Module):
    """GPT-2 block (pre-LayerNorm): x + Attn(LN(x)), then x + MLP(LN(x)); the official config uses a ReLU MLP."""

    def __init__(self, embed_dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.qkv, self.proj = nn.Linear(embed_dim, 3 * embed_dim), nn.Linear(embed_dim, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.ReLU(), nn.Linear(4 * embed_dim, embed_dim),
                                 nn.Dropout(dropout))
        self.resid_dropout = nn.Dropout(dropout)

    def attention(self, x):  # x: (B, L, C)
        batch, length, channels = x.shape
        # (B, L, 3C) -> 3 x (B, L, H, C/H) -> 3 x (B, H, L, C/H)
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, channels // self.n_heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(C/H) + causal mask) v; the causal mask lets token i attend to tokens j <= i only.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, length, channels)  # (B, H, L, C/H) -> (B, L, C)
        return self.resid_dropout(self.proj(y))

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class DecisionTransformer(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, action_low, action_high, embed_dim: int, n_layers: int,
                 n_heads: int, dropout: float, max_ep_len: int):
        super().__init__()
        # Separate linear embeddings per modality, and a learned embedding of the timestep (Section 3, "Architecture").
        self.embed_timestep = nn.Embedding(max_ep_len, embed_dim)
        self.embed_return = nn.Linear(1, embed_dim)
        self.embed_state = nn.Linear(obs_dim, embed_dim)
        self.embed_action = nn.Linear(act_dim, embed_dim)
        self.embed_ln = nn.LayerNorm(embed_dim)  # the official code normalises the stacked tokens before the GPT
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embed_dim, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(embed_dim)
        self.predict_action = nn.Linear(embed_dim, act_dim)
        # tanh head scaled to the action bounds, per dimension: a = center + half_range * tanh(.)
        # Deviation: the official head is a plain tanh (right for MuJoCo's [-1, 1] bounds only); identical there.
        low, high = torch.as_tensor(action_low), torch.as_tensor(action_high)
        self.register_buffer("action_center", (high + low) / 2)
        self.register_buffer("action_half_range", (high - low) / 2)
        # The official trajectory_gpt2.py initialises the transformer as HuggingFace GPT-2's _init_weights: Linear
        # weights N(0, 0.02), biases 0, LayerNorms 1 and 0; the embeddings and the head keep PyTorch's defaults.
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, states, actions, returns_to_go, timesteps):
        """states (B, T, obs_dim), actions (B, T, act_dim), returns_to_go (B, T, 1), timesteps (B, T) -> actions
        (B, T, act_dim); prediction t comes from the s_t token, so it sees R_1..R_t, s_1..s_t, a_1..a_{t-1} only."""
        batch, length = states.shape[:2]
        time_embedding = self.embed_timestep(timesteps)  # (B, T, C), added to all three tokens of a step
        tokens = torch.stack([self.embed_return(returns_to_go) + time_embedding,
                              self.embed_state(states) + time_embedding,
                              self.embed_action(actions) + time_embedding], dim=2)  # (B, T, 3, C)
        x = tokens.reshape(batch, 3 * length, -1)  # (B, 3T, C): R_1, s_1, a_1, R_2, s_2, a_2, ...
        x = self.embed_dropout(self.embed_ln(x))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x).reshape(batch, length, 3, -1)  # (B, 3T, C) -> (B, T, 3, C)
        # a_t is predicted from the hidden state of the s_t token (index 1 of each step's triple).
        return self.action_center + self.action_half_range * torch.tanh(self.predict_action(x[:, :, 1]))


# --- Training (Section 3, "Training", and Algorithm 1's training loop) ------------------------------------------------
def action_loss(model, states, actions, returns_to_go, timesteps, mask):
    """Mean-squared error on actions, over real (unpadded) steps only (Algorithm 1: MSE for continuous actions)."""
    predicted = model(states, actions, returns_to_go, timesteps)  # (B, K, act_dim)
    squared_error = ((predicted - actions) ** 2).mean(dim=-1)  # (B, K)
    return (squared_error * mask).sum() / mask.sum()


def train_step(model, optimizer, scheduler, buffer: SequenceBuffer, generator: torch.Generator, batch_size: int,
               context_len: int, grad_clip: float, loss_fn=action_loss):
    """One optimiser step of Algorithm 1. Returns (loss, gradient norm before clipping) as tensors (no host sync)."""
    # Algorithm 1: a minibatch of K-step windows (R, s, a, t) from the dataset.
    states, actions, rtg, timesteps, mask = buffer.sample(batch_size, context_len, generator)
    # Algorithm 1: predict every a_t from (R_1..R_t, s_1..s_t, a_1..a_{t-1}); loss = mean((a_pred - a)^2).
    loss = loss_fn(model, states, actions, rtg, timesteps, mask)
    # Algorithm 1: optimizer.zero_grad(); loss.backward().
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Official code: clip the global gradient norm, take the AdamW step, advance the linear warm-up.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss, grad_norm


# --- Evaluation (Section 3 and Algorithm 1's evaluation loop): every episode of every target in one vector env --------
@torch.no_grad()
def evaluate(model: nn.Module, env_fn, target_returns: list[float], episodes: int, seed: int, state_mean: np.ndarray,
             state_std: np.ndarray, reward_scale: float, context_len: int, max_steps: int, device) -> np.ndarray:
    """Returns (len(target_returns), episodes); `env_fn()` makes one env. Episode i of every target resets with seed
    + i, so targets are compared on the same initial states and every evaluation is reproducible."""
    model.eval()
    n_envs = len(target_returns) * episodes
    envs = gym.vector.SyncVectorEnv([env_fn] * n_envs)
    obs, _ = envs.reset(seed=[seed + i for _ in target_returns for i in range(episodes)])
    obs_dim, act_dim = obs.shape[1], envs.single_action_space.shape[0]
    low, high = envs.single_action_space.low, envs.single_action_space.high
    mean, std = torch.as_tensor(state_mean, device=device), torch.as_tensor(state_std, device=device)
    # Histories of every episode: (E, max_steps, ...). Row t holds s_t, a_t, R_t and t.
    states, actions, rtg = (torch.zeros(n_envs, max_steps, dim, device=device) for dim in (obs_dim, act_dim, 1))
    timesteps = torch.arange(max_steps, device=device).expand(n_envs, max_steps)
    # Algorithm 1: R_1 = the target return, scaled as in training.
    rtg[:, 0, 0] = torch.tensor(target_returns, device=device).repeat_interleave(episodes) / reward_scale
    returns, active = np.zeros(n_envs), np.ones(n_envs, dtype=bool)
    for t in range(max_steps):
        states[:, t] = (torch.as_tensor(obs, dtype=torch.float32, device=device) - mean) / std
        first = max(0, t + 1 - context_len)  # the last min(t + 1, K) steps; a_t is still zero and unseen (causal)
        rows = torch.as_tensor(np.flatnonzero(active), device=device)  # only episodes still running
        predicted = model(states[rows, first:t + 1], actions[rows, first:t + 1], rtg[rows, first:t + 1],
                          timesteps[rows, first:t + 1])[:, -1]  # (E_active, act_dim): a_t from the s_t token
        actions[rows, t] = predicted
        env_actions = np.zeros((n_envs, act_dim), np.float32)
        env_actions[active] = np.clip(predicted.cpu().numpy(), low, high)
        obs, rewards, terminated, truncated, _ = envs.step(env_actions)
        returns[active] += rewards[active]
        if t + 1 < max_steps:  # Algorithm 1: R_{t+1} = R_t - r_t ("decrement the target return by the reward")
            rewards_ = torch.as_tensor(rewards, dtype=torch.float32, device=device)
            rtg[:, t + 1, 0] = rtg[:, t, 0] - rewards_ / reward_scale
        active &= ~(terminated | truncated)  # a finished episode is not stepped by us again (its env autoresets)
        if not active.any():
            break
    envs.close()
    model.train()
    return returns.reshape(len(target_returns), episodes)


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
    if args.eval_checkpoint:  # evaluation-only mode: model settings, env, normalisation and targets come from it
        checkpoint = load_checkpoint(args.eval_checkpoint)
        task = adopt_checkpoint_settings(args, checkpoint)
        eval_seed = args.eval_seed if args.eval_seed is not None else checkpoint["args"]["seed"]
    else:
        if args.resume:  # the run's state and folder come from the checkpoint; its settings are checked, not adopted
            checkpoint = load_checkpoint(args.resume)
            check_resume_flags(args, checkpoint)
        data = load_dataset(args.dataset, args.download_dataset)
        task, eval_seed = dataset_task(data, args), args.seed
    env_fn = lambda: make_env(task["env_id"], eval_seed, task["env_kwargs"])  # noqa: E731
    low, high, max_steps = check_dataset_env(env_fn(), task, args.max_ep_len, args.eval_checkpoint or args.dataset)
    run_name = checkpoint["run_name"] if args.resume else \
        f"{task['env_id']}__{args.exp_name}__{args.seed}__{int(time.time())}"
    video_dir = f"videos/{run_name}" if args.capture_video else None
    if video_dir:  # rendering is checked now, not after training
        make_env(task["env_id"], eval_seed, task["env_kwargs"], video_dir).close()
    model = DecisionTransformer(task["obs_dim"], task["act_dim"], low, high, args.embed_dim, args.n_layers,
                                args.n_heads, args.dropout, args.max_ep_len).to(device)

    def evaluate_targets(final=False):  # --capture-video records the final (or evaluation-only) evaluation
        recording = final and video_dir is not None
        returns = evaluate(model, recording_env_fn(task, eval_seed, args.eval_episodes, video_dir) if recording
                           else env_fn, task["target_returns"], args.eval_episodes, eval_seed + 10_000,
                           task["state_mean"], task["state_std"], args.reward_scale, args.context_len, max_steps,
                           device)
        return returns, [describe_returns(r, task["refs"], task["ref_source"]) for r in returns]

    if args.eval_checkpoint:
        try:
            model.load_state_dict(checkpoint["model"])
        except (RuntimeError, KeyError) as error:
            fail(f"checkpoint '{args.eval_checkpoint}' does not match its own settings ({error}); re-create it")
        returns, texts = evaluate_targets(final=True)
        for target, text in zip(task["target_returns"], texts):
            print(f"evaluation of {args.eval_checkpoint} (step {checkpoint['global_step']}) on {task['env_id']}, "
                  f"target {target:g}: {text}")
        return returns

    buffer = SequenceBuffer(data, task["state_mean"], task["state_std"], args.reward_scale, args.max_ep_len, device)
    # AdamW on every parameter (the official code decays LayerNorm and biases too); linear warm-up, then constant.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / args.warmup_steps, 1.0))
    loss_fn = torch.compile(action_loss) if args.compile else action_loss
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)
    start = restore_training(checkpoint, task, model, optimizer, scheduler, generator) if args.resume else 0
    writer = make_writer(args, run_name, purge_step=start + 1 if args.resume else None)
    episode_returns = task["episode_returns"]
    print(f"run {run_name}: {args.dataset} ({buffer.size} steps, {len(episode_returns)} episodes, returns mean "
          f"{episode_returns.mean():.1f}, best {episode_returns.max():.1f}) -> {task['env_id']}, device {device}, "
          f"{sum(p.numel() for p in model.parameters())} parameters, targets {task['target_returns']}"
          + (f", resumed at step {start}" if args.resume else ""))

    def run_evaluation(step):
        returns, texts = evaluate_targets(final=step == args.total_steps)
        for target, target_returns, text in zip(task["target_returns"], returns, texts):
            writer.add_scalar(f"eval/return_target_{target:g}", target_returns.mean(), step)
            if task["refs"] is not None:
                writer.add_scalar(f"eval/normalized_score_target_{target:g}",
                                  normalized_score(target_returns.mean(), task["refs"]), step)
            print(f"eval at step {step} (target {target:g}): {text}")
        save(step)
        return texts

    def save(step):  # with --save-model: all --resume needs (state mean and std as tensors: weights_only reads them)
        if args.save_model:
            saved = {key: torch.as_tensor(task[key]) if key.startswith("state_") else task[key] for key in TASK_KEYS}
            writer.flush()  # the events up to this step: a resumed run keeps them and purges the later ones
            atomic_write(f"runs/{run_name}/{SCRIPT}.pt", lambda file: torch.save(dict(
                script=SCRIPT, version=CHECKPOINT_VERSION, args=asdict(args), run_name=run_name, device=device.type,
                global_step=step, task=saved, model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), generator=generator.get_state(), random_state=random_state()), file))

    progress = Progress(start, args.total_steps)
    for step in range(start + 1, args.total_steps + 1):
        loss, grad_norm = train_step(model, optimizer, scheduler, buffer, generator, args.batch_size,
                                     args.context_len, args.grad_clip, loss_fn)

        # Logging: the only host syncs of the training loop happen here, every --log-every steps.
        if step % args.log_every == 0 or step == args.total_steps:
            sps, eta = progress.tick(step)
            writer.add_scalar("losses/action_mse", loss.item(), step)
            writer.add_scalar("charts/grad_norm", grad_norm.item(), step)
            writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
            writer.add_scalar("charts/SPS", sps, step)
            print(f"step {step}/{args.total_steps} | {sps:.0f} SPS | ETA {eta} | action mse {loss.item():.4f}",
                  flush=True)
        if step % args.eval_every == 0 and step != args.total_steps:
            with progress.paused():
                run_evaluation(step)  # and the checkpoint
        elif args.checkpoint_every and step % args.checkpoint_every == 0 and step != args.total_steps:
            with progress.paused():
                save(step)

    for target, text in zip(task["target_returns"], run_evaluation(args.total_steps)):
        print(f"final evaluation (target {target:g}): {text}")
    close_writer(args, writer)


# ======================================================================================================================
# Not in the paper: argument checks, environments, data, checkpoints, logging and errors
# ======================================================================================================================
def validate_args(args: Args):
    """Reject nonsensical settings up front, with a one-line error."""
    for name in ("context_len embed_dim n_layers n_heads max_ep_len batch_size learning_rate warmup_steps grad_clip "
                 "total_steps reward_scale eval_every eval_episodes log_every").split():
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.weight_decay < 0 or not 0.0 <= args.dropout < 1.0:
        fail(f"--weight-decay must be >= 0 and --dropout in [0, 1), got {args.weight_decay} and {args.dropout}")
    if args.embed_dim % args.n_heads != 0:
        fail(f"--embed-dim ({args.embed_dim}) must be divisible by --n-heads ({args.n_heads})")
    for flag, seed in (("--seed", args.seed), ("--eval-seed", args.eval_seed)):
        if seed is not None and not 0 <= seed < 2**32 - 20_000:
            fail(f"{flag} must be in [0, 2**32 - 20000) (evaluation uses seed + 10000 + episode), got {seed}")
    if args.target_returns is not None and len(args.target_returns) == 0:
        fail("--target-returns needs at least one value, e.g. --target-returns 3600 1800")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume (continue training) or --eval-checkpoint (evaluate only), not both")
    if args.checkpoint_every is not None and (args.checkpoint_every <= 0 or not args.save_model):
        fail(f"--checkpoint-every {args.checkpoint_every} needs --save-model and a value > 0 (or drop it)")
    if args.eval_checkpoint is None and args.dataset is None:
        fail("pass --dataset (an .npz, a D4RL .hdf5 or a Minari id), or --eval-checkpoint to evaluate a trained model")
    if args.capture_video:
        try:
            import moviepy  # noqa: F401  (RecordVideo writes mp4 files with it)
        except ImportError:
            fail("--capture-video needs moviepy: pip install moviepy (MuJoCo on a headless machine: MUJOCO_GL=egl)")


def make_env(env_id: str, seed: int, env_kwargs: dict | None = None, video_dir: str | None = None,
             video_prefix: str = "eval") -> gym.Env:
    """gym.make(env_id, **env_kwargs), checked: flat Box observations, a flat bounded Box action space. Episodes are
    seeded at reset; `seed` seeds the action space. With `video_dir`, its first episode is recorded there as
    `{video_prefix}-episode-0.mp4`."""
    try:
        env = gym.make(env_id, **{**(env_kwargs or {}), **({"render_mode": "rgb_array"} if video_dir else {})})
    except (gym.error.Error, TypeError) as error:
        fail(f"cannot make environment '{env_id}' ({error}); pass --env-id with a registered id such as Hopper-v5 "
             "(MuJoCo ones need pip install -r requirements.txt)")
    except Exception as error:  # e.g. MUJOCO_GL naming a rendering backend that is not installed
        fail(f"cannot make environment '{env_id}' ({type(error).__name__}: {str(error).partition(chr(10))[0]}); "
             "if MUJOCO_GL is set, check that its backend (egl or osmesa) is installed")
    space, obs_space = env.action_space, env.observation_space
    if not isinstance(space, gym.spaces.Box) or not isinstance(obs_space, gym.spaces.Box) or len(space.shape) != 1 \
            or len(obs_space.shape) != 1 or not np.isfinite(space.low).all() or not np.isfinite(space.high).all():
        fail(f"{env_id} has observations {obs_space} and actions {space}; this script needs flat Box observations "
             "(FlattenObservation) and a flat, bounded Box action space")
    if video_dir:
        try:  # one frame now, so a broken rendering set-up fails with a one-line error
            env.reset(seed=seed)
            env.render()
        except Exception as error:
            fail(f"cannot render {env_id} for --capture-video ({type(error).__name__}); on a headless machine "
                 "set MUJOCO_GL=egl (or osmesa, with its libraries installed)")
        with warnings.catch_warnings():  # the recording envs of one evaluation share the folder: not an overwrite
            warnings.simplefilter("ignore")
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda episode: episode == 0,
                                           name_prefix=video_prefix, disable_logger=True)
    env.action_space.seed(seed)
    return env


def recording_env_fn(task: dict, seed: int, episodes: int, video_dir: str):
    """An `env_fn` for `evaluate` whose envs record the first episode of each target return: evaluate's vector env
    makes its envs in order, episodes of the first target first (`target-{R}-episode-0.mp4`)."""
    made = iter(range(len(task["target_returns"]) * episodes))

    def env_fn():
        index = next(made)
        target = task["target_returns"][index // episodes]
        return make_env(task["env_id"], seed, task["env_kwargs"], video_dir if index % episodes == 0 else None,
                        f"target-{target:g}")
    return env_fn


def check_dataset_env(env: gym.Env, task: dict, max_ep_len: int, source: str):
    """Check that the data (or checkpoint) `source` fits this env, and close it. Returns (action low, high, steps)."""
    env_id, space, max_steps = env.spec.id, env.action_space, env.spec.max_episode_steps
    dims = (env.observation_space.shape[0], space.shape[0])
    env.close()
    if dims != (task["obs_dim"], task["act_dim"]):
        fail(f"dataset '{source}' has obs_dim {task['obs_dim']} / act_dim {task['act_dim']} but {env_id} has "
             f"{dims[0]} / {dims[1]}; pass --env-id of the environment the data came from")
    if max_steps is None or max_steps > max_ep_len:
        fail(f"{env_id} episodes last up to {max_steps} steps, beyond the timestep embedding's --max-ep-len "
             f"{max_ep_len}; raise --max-ep-len (or use an env with a time limit)")
    return space.low.astype(np.float32), space.high.astype(np.float32), max_steps


# --- Datasets: a docs/datasets.md .npz, a D4RL .hdf5, or a Minari id -> one dict of flat arrays -----------------------
D4RL_REF_SCORES = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "ant": (-325.6, 3879.7),
                   "walker2d": (1.629008, 4592.3)}  # D4RL's random and expert returns on v2 (docs/datasets.md)


def read_file(path: str) -> dict:
    """A .npz in the docs/datasets.md layout, or a D4RL .hdf5 file (its top-level datasets and attributes)."""
    if not os.path.isfile(path):
        fail(f"dataset '{path}' not found; write one with `python sac_continuous.py --env-id Hopper-v5 "
             f"--export-replay {path}` or pass a Minari id such as mujoco/hopper/medium-v0")
    if not path.endswith((".hdf5", ".h5")):
        try:
            with np.load(path, allow_pickle=False) as file:
                return {key: file[key] for key in file.files}
        except Exception as error:
            fail(f"cannot read dataset '{path}' ({type(error).__name__}); it is corrupt or not an .npz: write it again")
    try:
        import h5py
    except ImportError:
        fail(f"reading the D4RL file '{path}' needs h5py: pip install h5py")
    try:
        with h5py.File(path, "r") as file:  # D4RL keeps extras under infos/ and metadata/
            data = {key: file[key][()] for key in file.keys() if isinstance(file[key], h5py.Dataset)}
            return {**{key: value for key, value in file.attrs.items() if key not in data}, **data}
    except OSError as error:
        fail(f"cannot read dataset '{path}' ({error}); it is corrupt or not an HDF5 file: download or write it again")


def load_minari(dataset_id: str, download: bool) -> dict:
    """Minari episodes hold T + 1 observations s_0..s_T: observations = s_0..s_T-1."""
    try:
        import minari
    except ImportError:
        fail(f"'{dataset_id}' looks like a Minari id; reading it needs minari: pip install minari")
    try:
        dataset = minari.load_dataset(dataset_id, download=download)
    except FileNotFoundError:
        fail(f"Minari dataset '{dataset_id}' is not on this machine; add --download-dataset to fetch it")
    except ImportError:  # what minari raises when its download extra (huggingface_hub) is missing
        fail(f"downloading Minari dataset '{dataset_id}' needs Minari's download extra: pip install \"minari[hf]\"")
    except Exception as error:
        fail(f"cannot load Minari dataset '{dataset_id}' ({type(error).__name__}: {str(error).splitlines()[0]}); "
             "check the id and your internet connection")
    episodes = list(dataset.iterate_episodes())
    if not episodes or not isinstance(episodes[0].observations, np.ndarray):
        fail(f"Minari dataset '{dataset_id}' is empty or has dict observations; this script needs flat Box data")
    concatenate = lambda field, part=slice(None): np.concatenate([getattr(e, field)[part] for e in episodes])  # noqa
    env = {}
    if dataset.env_spec is not None:  # evaluate on the env the metadata records for evaluation, with its arguments
        try:
            recovered = dataset.recover_environment(eval_env=True)
            spec = recovered.spec
            recovered.close()
        except gym.error.Error as error:
            fail(f"cannot make the evaluation env of Minari dataset '{dataset_id}' ({error}); pass --env-id")
        env = dict(env_id=spec.id, env_kwargs={**spec.kwargs, "max_episode_steps": spec.max_episode_steps})
    metadata = dataset.storage.metadata
    refs = {} if metadata.get("ref_min_score") is None or metadata.get("ref_max_score") is None else dict(
        ref_min_score=metadata["ref_min_score"], ref_max_score=metadata["ref_max_score"], ref_source="Minari metadata")
    return dict(observations=concatenate("observations", slice(None, -1)), actions=concatenate("actions"),
                rewards=concatenate("rewards"), terminals=concatenate("terminations"),
                timeouts=concatenate("truncations"), **env, **refs)


def load_dataset(source: str, download: bool = False) -> dict:
    """Read any supported source into flat arrays: observations (N, obs_dim) float32, actions (N, act_dim) float32,
    rewards (N,) float32, terminals and timeouts (N,) bool; plus env_id, env_kwargs and score references if known."""
    if source.endswith((".npz", ".hdf5", ".h5")) or os.path.exists(source) or "/" not in source:
        data = {**read_file(source), "ref_source": "the dataset file's references"}
    else:
        data = load_minari(source, download)
    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    if any(key not in data for key in keys):
        fail(f"dataset '{source}' lacks the keys {[k for k in keys if k not in data]}; see docs/datasets.md")
    if len(data["rewards"]) == 0 or any(len(data[key]) != len(data["rewards"]) for key in keys) \
            or np.ndim(data["observations"]) != 2 or np.ndim(data["actions"]) != 2:
        fail(f"dataset '{source}' has inconsistent shapes {[np.shape(data[key]) for key in keys]}; write it again "
             "(docs/datasets.md: one row per transition)")
    out = {key: np.asarray(data[key], np.float32) for key in ("observations", "actions", "rewards")}
    out["terminals"] = np.asarray(data["terminals"], bool)
    out["timeouts"] = np.asarray(data["timeouts"], bool) & ~out["terminals"]
    out["timeouts"][-1] |= not out["terminals"][-1]  # an unfinished last episode is kept, as if truncated there
    if not all(np.isfinite(out[key]).all() for key in ("observations", "actions", "rewards")):
        fail(f"dataset '{source}' contains NaN or infinite values; write it again")
    env_id = data.get("env_id")
    env_id = env_id.decode() if isinstance(env_id, bytes) else env_id
    out.update(env_id=str(env_id) if env_id is not None and str(env_id) else None, env_kwargs=data.get("env_kwargs"))
    if "ref_min_score" in data and "ref_max_score" in data:
        out["ref_scores"] = (float(data["ref_min_score"]), float(data["ref_max_score"]), data["ref_source"])
    return out


def dataset_task(data: dict, args: Args) -> dict:
    """What evaluation needs besides the model: the env (--env-id, else the data's), the data's state mean and std
    (+1e-6), the targets (--target-returns, the official ones, else the data's best and (mean + best) / 2) and the
    normalized score's references (the data's own, else D4RL's for a known task; docs/datasets.md)."""
    env_id, env_kwargs = (args.env_id, None) if args.env_id else (data["env_id"], data["env_kwargs"])
    if env_id is None:
        fail(f"dataset '{args.dataset}' does not name its environment; pass --env-id (e.g. Hopper-v5)")
    task_name = env_id.split("-v")[0].lower()  # "Hopper-v5" -> "hopper"
    episode_returns = np.add.reduceat(data["rewards"].astype(np.float64), episode_bounds(data)[0])
    refs, ref_source = (data["ref_scores"][:2], data["ref_scores"][2]) if "ref_scores" in data else (None, None)
    if refs is None and task_name in D4RL_REF_SCORES:
        refs, ref_source = D4RL_REF_SCORES[task_name], f"D4RL v2 references for {task_name}"
    target_returns = args.target_returns or OFFICIAL_TARGET_RETURNS.get(task_name) or [
        float(episode_returns.max()), float((episode_returns.max() + episode_returns.mean()) / 2)]
    return dict(env_id=env_id, env_kwargs=env_kwargs, obs_dim=data["observations"].shape[1],
                act_dim=data["actions"].shape[1], state_mean=data["observations"].mean(axis=0),
                state_std=data["observations"].std(axis=0) + 1e-6, target_returns=list(target_returns), refs=refs,
                ref_source=ref_source, episode_returns=episode_returns)


def normalized_score(mean_return: float, refs: tuple[float, float] | None) -> float | None:
    """100 (R - R_random) / (R_expert - R_random), or None without references (docs/datasets.md)."""
    return None if refs is None else 100.0 * (mean_return - refs[0]) / (refs[1] - refs[0])


def describe_returns(returns: np.ndarray, refs: tuple[float, float] | None, source: str | None = None) -> str:
    text = f"{returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes"
    score = normalized_score(returns.mean(), refs)
    return text if score is None else f"{text} (normalized score {score:.1f}, {source})"


# --- Checkpoints ------------------------------------------------------------------------------------------------------
MODEL_KEYS = ("context_len", "embed_dim", "n_layers", "n_heads", "dropout", "max_ep_len", "reward_scale")
TASK_KEYS = ("env_id", "env_kwargs", "obs_dim", "act_dim", "state_mean", "state_std", "target_returns", "refs",
             "ref_source")


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
        fail(f"checkpoint '{path}' was written by {script + '.py' if script else 'another program'}, not {SCRIPT}.py; "
             "evaluate it with that script")
    if checkpoint.get("version") != CHECKPOINT_VERSION or not set(TASK_KEYS) <= set(checkpoint.get("task", {})):
        fail(f"checkpoint '{path}' has format version {checkpoint.get('version')}, not {CHECKPOINT_VERSION}; "
             "re-create it with this script's --save-model")
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


def restore_training(checkpoint: dict, task: dict, model, optimizer, scheduler, generator) -> int:
    """--resume: check that the data and device (the generator's) are the run's own, restore every state the checkpoint
    holds, remove the temporary file that a kill during a checkpoint write leaves, and return the checkpoint's step."""
    if not all(np.array_equal(task[key], checkpoint["task"][key]) for key in ("state_mean", "state_std")):
        fail(f"dataset '{checkpoint['args']['dataset']}' is not the data of the run (its state mean and std differ "
             "from the checkpoint's); resume with the run's own data, or start a new run")
    if checkpoint["device"] != generator.device.type:
        fail(f"the run trained on {checkpoint['device']}, not {generator.device.type}: resume it on its own device "
             "(--no-cuda for the cpu)")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    generator.set_state(checkpoint["generator"])
    set_random_state(checkpoint["random_state"])
    for temporary in glob.glob(glob.escape(f"runs/{checkpoint['run_name']}/{SCRIPT}.pt") + ".tmp*"):
        os.remove(temporary)
    return checkpoint["global_step"]


def adopt_checkpoint_settings(args: Args, checkpoint: dict) -> dict:
    """The checkpoint's model settings and task (see dataset_task); --env-id and --target-returns override its own."""
    for key in MODEL_KEYS:
        setattr(args, key, checkpoint["args"][key])
    task = {key: value.numpy() if key.startswith("state_") else value for key, value in checkpoint["task"].items()}
    if args.env_id:
        task.update(env_id=args.env_id, env_kwargs=None)
    return {**task, "target_returns": args.target_returns or task["target_returns"]}


# --- Logging and errors -----------------------------------------------------------------------------------------------
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
