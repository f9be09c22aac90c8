"""Decision Transformer (DT) for offline RL, in one file.

Paper: L. Chen, K. Lu, A. Rajeswaran, K. Lee, A. Grover, M. Laskin, P. Abbeel, A. Srinivas, I. Mordatch,
"Decision Transformer: Reinforcement Learning via Sequence Modeling", arXiv:2106.01345 (2021).

What this file implements, in the paper's terms:
  * Section 3 / Algorithm 1: trajectories as sequences (R_1, s_1, a_1, R_2, s_2, a_2, ...) of returns-to-go
    R_t = sum_{t' >= t} r_t' (undiscounted; Section 3, "Trajectory representation"), states and actions; a linear
    embedding per modality plus a learned embedding of the timestep added to all three tokens; a causal GPT that
    predicts a_t from the hidden state of the s_t token; mean-squared error on actions only.
  * Evaluation (Section 3, "Trajectory representation", and Algorithm 1): condition on a target return R_1, then
    after each step R_{t+1} = R_t - r_t ("decrement the target return by the achieved reward").
  * The official gym settings (kzl/decision-transformer, gym/experiment.py): K = 20, 128 dims, 3 layers, 1 head,
    dropout 0.1, AdamW 1e-4 with weight decay 1e-4, 10k linear warm-up steps, gradient-norm clip 0.25, batch 64,
    100k steps, returns-to-go divided by 1000, states normalised by the dataset's mean and std, trajectories sampled
    in proportion to their length, targets hopper 3600/1800, halfcheetah 12000/6000, walker2d 5000/2500.
What it leaves out: the Atari experiments and the state/return prediction heads the official code defines but never
trains.
Padding: a training window that runs past its episode's end is padded on the RIGHT, and attention is causal, so no
real token can attend to a pad and pad values cannot change any real prediction; padded positions are excluded from
the loss. Evaluation never pads: every parallel episode has the same length so far, and the model reads the last
min(t, K) steps. (The official code pads on the left with different pad values in training and evaluation.)
Checked against: kzl/decision-transformer (gym/), CORL `algorithms/offline/dt.py`. Departures: `# Deviation:`.

Commands:
    python sac_continuous.py --env-id HalfCheetah-v5 --total-timesteps 100000 --export-replay data/hc_replay.npz
    python decision_transformer.py --dataset data/hc_replay.npz
    python decision_transformer.py --dataset mujoco/hopper/medium-v0 --download-dataset
    python decision_transformer.py --eval-checkpoint runs/<run_name>/decision_transformer.pt --target-returns 3600
"""

import math
import os
import random
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

SCRIPT = "decision_transformer"
CHECKPOINT_VERSION = 1


def fail(message: str):
    """Stop with a one-line error that names the fix (no traceback)."""
    raise SystemExit(f"{SCRIPT}.py: error: {message}")


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------
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

    # Data and environment
    dataset: str | None = None
    """a DATASET.md .npz (what sac_continuous.py --export-replay writes), a D4RL .hdf5 file, or a Minari id such as
    mujoco/hopper/medium-v0"""
    download_dataset: bool = False
    """let Minari download a dataset id that is not on this machine (needs internet)"""
    env_id: str | None = None
    """evaluation environment; None means the dataset's own `env_id`"""

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
    """dropout on embeddings, attention weights and residual branches"""
    max_ep_len: int = 1000
    """size of the learned timestep embedding; must exceed every episode's length"""

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
    """returns-to-go are divided by this before they enter the model"""

    # Evaluation and logging
    target_returns: list[float] | None = None
    """returns to condition on, each evaluated separately; None means the official targets for hopper, halfcheetah
    and walker2d, else the dataset's best episode return and the midpoint of its mean and best"""
    eval_every: int = 10_000
    """evaluate every N gradient steps (official: after each iteration of 10k)"""
    eval_episodes: int = 100
    """episodes per target return, run in parallel in one vector env (official: 100)"""
    log_every: int = 1_000
    """write losses to TensorBoard and print a progress line every N gradient steps"""

    # Checkpoints
    save_model: bool = False
    """write `runs/{run_name}/decision_transformer.pt` (atomically) at every evaluation and at the end"""
    eval_checkpoint: str | None = None
    """evaluation-only mode: load this checkpoint (no dataset needed) and print mean +- std per target return"""


def validate_args(args: Args):
    """Reject nonsensical settings up front, with a one-line error."""
    positive = ["context_len", "embed_dim", "n_layers", "n_heads", "max_ep_len", "batch_size", "learning_rate",
                "warmup_steps", "grad_clip", "total_steps", "reward_scale", "eval_every", "eval_episodes", "log_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.weight_decay < 0:
        fail(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0.0 <= args.dropout < 1.0:
        fail(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.embed_dim % args.n_heads != 0:
        fail(f"--embed-dim ({args.embed_dim}) must be divisible by --n-heads ({args.n_heads})")
    if not 0 <= args.seed < 2**32 - 20_000:
        fail(f"--seed must be in [0, 2**32 - 20000) (evaluation uses seed + 10000 + episode), got {args.seed}")
    if args.target_returns is not None and len(args.target_returns) == 0:
        fail("--target-returns needs at least one value, e.g. --target-returns 3600 1800")
    if args.eval_checkpoint is None and args.dataset is None:
        fail("pass --dataset (a .npz from sac_continuous.py --export-replay, a D4RL .hdf5 or a Minari id), "
             "or --eval-checkpoint to evaluate a trained model")


# ----------------------------------------------------------------------------------------------------------------------
# Dataset: .npz (DATASET.md), D4RL .hdf5, or a Minari id -> one dict of flat arrays
# ----------------------------------------------------------------------------------------------------------------------
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
D4RL_REF_SCORES = {  # D4RL's random (0) and expert (100) returns, from DATASET.md (measured on v2 envs)
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
OFFICIAL_TARGET_RETURNS = {"hopper": [3600.0, 1800.0], "halfcheetah": [12000.0, 6000.0], "walker2d": [5000.0, 2500.0]}


def task_name(env_id: str) -> str:
    """"Hopper-v5" -> "hopper" (the key of the D4RL tables)."""
    return env_id.split("-v")[0].lower()


def read_npz(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as file:
            data = {key: file[key] for key in file.files}
    except Exception as error:
        fail(f"cannot read dataset '{path}' ({type(error).__name__}); it is corrupt or not an .npz: write it again")
    return data


def read_hdf5(path: str) -> dict:
    try:
        import h5py
    except ImportError:
        fail(f"reading the D4RL file '{path}' needs h5py: pip install h5py")
    try:
        with h5py.File(path, "r") as file:  # top-level datasets only (D4RL keeps extras under infos/ and metadata/)
            data = {key: file[key][()] for key in file.keys() if isinstance(file[key], h5py.Dataset)}
            data.update({key: value for key, value in file.attrs.items() if key not in data})
    except OSError as error:
        fail(f"cannot read dataset '{path}' ({error}); it is corrupt or not an HDF5 file: download or write it again")
    if isinstance(data.get("env_id"), bytes):
        data["env_id"] = data["env_id"].decode()
    return data


def read_minari(dataset_id: str, download: bool) -> dict:
    """Minari episodes hold T + 1 observations s_0..s_T: observations = s_0..s_T-1, next_observations = s_1..s_T."""
    try:
        import minari
    except ImportError:
        fail(f"'{dataset_id}' looks like a Minari id; reading it needs minari: pip install minari "
             "(or pass the path of an .npz / .hdf5 file)")
    try:
        dataset = minari.load_dataset(dataset_id, download=download)
    except FileNotFoundError:
        fail(f"Minari dataset '{dataset_id}' is not on this machine; add --download-dataset to fetch it "
             "(or check the id with `minari list remote`)")
    except Exception as error:
        fail(f"cannot load Minari dataset '{dataset_id}' ({type(error).__name__}: {str(error).splitlines()[0]}); "
             "check the id and your internet connection")
    episodes = list(dataset.iterate_episodes())
    if not episodes or not isinstance(episodes[0].observations, np.ndarray):
        fail(f"Minari dataset '{dataset_id}' is empty or has dict observations; this script needs flat Box data")
    data = {
        "observations": np.concatenate([e.observations[:-1] for e in episodes]),
        "next_observations": np.concatenate([e.observations[1:] for e in episodes]),
        "actions": np.concatenate([e.actions for e in episodes]),
        "rewards": np.concatenate([e.rewards for e in episodes]),
        "terminals": np.concatenate([e.terminations for e in episodes]),
        "timeouts": np.concatenate([e.truncations for e in episodes]),
    }
    if dataset.env_spec is not None:
        data["env_id"] = dataset.env_spec.id
    metadata = dataset.storage.metadata
    if metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        data["ref_min_score"], data["ref_max_score"] = metadata["ref_min_score"], metadata["ref_max_score"]
        data["ref_source"] = "Minari metadata"
    return data


def load_dataset(source: str, download: bool = False) -> dict:
    """Read any supported source into flat arrays: observations (N, obs_dim) float32, actions (N, act_dim) float32,
    rewards (N,) float32, terminals and timeouts (N,) bool, plus env_id and reference scores when known."""
    if source.endswith(".npz") or source.endswith((".hdf5", ".h5")) or os.path.exists(source) or "/" not in source:
        if not os.path.isfile(source):
            fail(f"dataset '{source}' not found; write one with `python sac_continuous.py --env-id Hopper-v5 "
                 f"--export-replay {source}` or pass a Minari id such as mujoco/hopper/medium-v0")
        data = read_hdf5(source) if source.endswith((".hdf5", ".h5")) else read_npz(source)
        if "ref_min_score" in data:
            data["ref_source"] = "the dataset file's references"
    else:
        data = read_minari(source, download)
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        fail(f"dataset '{source}' lacks the keys {missing}; DATASET.md lists the layout this script reads")
    n = len(data["rewards"])
    if n == 0 or any(len(data[key]) != n for key in REQUIRED_KEYS) or np.ndim(data["observations"]) != 2 \
            or np.ndim(data["actions"]) != 2:
        fail(f"dataset '{source}' has inconsistent shapes {[np.shape(data[key]) for key in REQUIRED_KEYS]}; "
             "write it again (DATASET.md: one row per transition)")
    out = {key: np.asarray(data[key], np.float32) for key in ("observations", "actions", "rewards")}
    out["terminals"] = np.asarray(data["terminals"], bool)
    out["timeouts"] = np.asarray(data["timeouts"], bool) & ~out["terminals"]
    # An unfinished last episode (no flag on its final row) is kept, as if truncated there.
    out["timeouts"][-1] |= not out["terminals"][-1]
    if not all(np.isfinite(out[key]).all() for key in ("observations", "actions", "rewards")):
        fail(f"dataset '{source}' contains NaN or infinite values; write it again")
    env_id = data.get("env_id")
    out["env_id"] = str(env_id) if env_id is not None and str(env_id) else None
    out["ref_scores"] = None
    if "ref_min_score" in data and "ref_max_score" in data:
        out["ref_scores"] = (float(data["ref_min_score"]), float(data["ref_max_score"]), data["ref_source"])
    return out


def episode_bounds(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) row of every episode; an episode ends at a row where terminals | timeouts."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    starts = np.concatenate([[0], ends[:-1]])
    return starts, ends


def returns_to_go(rewards: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """R_t = sum_{t'=t}^{T} r_t' within each episode (Section 3: undiscounted; reset at episode boundaries)."""
    rtg = np.zeros_like(rewards, dtype=np.float64)
    for start, end in zip(starts, ends):
        rtg[start:end] = np.cumsum(rewards[start:end][::-1], dtype=np.float64)[::-1]
    return rtg.astype(np.float32)


class SequenceBuffer:
    """The whole dataset on the device as flat tensors; a batch of K-step windows is one gather, no Python loop.

    Official sampling: pick an episode with probability proportional to its length, then a start uniformly inside
    it. Together that is a uniform draw over all N rows, which is what `sample` does. A window that runs past its
    episode's end is cut there and padded on the right (mask 0, left out of the loss)."""

    def __init__(self, data: dict, state_mean: np.ndarray, state_std: np.ndarray, reward_scale: float,
                 max_ep_len: int, device: torch.device):
        starts, ends = episode_bounds(data)
        lengths = ends - starts
        if lengths.max() > max_ep_len:
            fail(f"the dataset has an episode of {lengths.max()} steps, more than --max-ep-len {max_ep_len}; "
                 f"raise --max-ep-len to at least {lengths.max()}")
        episode_of_row = np.repeat(np.arange(len(starts)), lengths)
        as_tensor = lambda array, dtype=torch.float32: torch.as_tensor(array, dtype=dtype, device=device)  # noqa: E731
        self.states = as_tensor((data["observations"] - state_mean) / state_std)  # (N, obs_dim)
        self.actions = as_tensor(data["actions"])  # (N, act_dim)
        self.returns_to_go = as_tensor(returns_to_go(data["rewards"], starts, ends) / reward_scale)  # (N,)
        self.timesteps = as_tensor(np.arange(len(episode_of_row)) - starts[episode_of_row], torch.long)  # (N,)
        self.episode_end = as_tensor(ends[episode_of_row], torch.long)  # (N,) end row of each row's episode
        self.size = len(episode_of_row)

    def sample(self, batch_size: int, context_len: int, generator: torch.Generator):
        """(states (B, K, obs_dim), actions (B, K, act_dim), returns_to_go (B, K, 1), timesteps (B, K), mask (B, K))"""
        device = self.states.device
        first = torch.randint(0, self.size, (batch_size,), device=device, generator=generator)  # (B,)
        rows = first[:, None] + torch.arange(context_len, device=device)  # (B, K)
        # Deviation: right padding (the official code pads on the left, with different pad values in training and
        # evaluation); under the causal mask no real token can see a pad, so pad values cannot matter.
        mask = rows < self.episode_end[first][:, None]  # (B, K) True on real steps, False on right padding
        # Pads repeat the window's first row: any valid value does, since no real token can attend to a pad.
        rows = torch.where(mask, rows, first[:, None])
        return self.states[rows], self.actions[rows], self.returns_to_go[rows][..., None], self.timesteps[rows], mask


# ----------------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------------
def check_env(env_id: str, obs_dim: int | None, act_dim: int | None, max_ep_len: int, dataset: str | None):
    """Make one env to read its spaces; check them against the data. Returns (action low, action high, max steps)."""
    try:
        env = gym.make(env_id)
    except gym.error.DependencyNotInstalled as error:
        fail(f"{env_id} needs a package that is missing ({error}); pip install -r requirements.txt")
    except gym.error.Error as error:
        fail(f"cannot make environment '{env_id}' ({error}); pass --env-id with a registered id such as Hopper-v5")
    space, obs_space = env.action_space, env.observation_space
    max_steps = env.spec.max_episode_steps if env.spec is not None else None
    env.close()
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1 or not np.all(np.isfinite(space.low)) \
            or not np.all(np.isfinite(space.high)):
        fail(f"{env_id} has actions {space}; the Decision Transformer here needs a flat, bounded Box action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has {obs_space} observations; this script needs a flat Box (FlattenObservation)")
    if obs_dim is not None and (obs_space.shape[0], space.shape[0]) != (obs_dim, act_dim):
        fail(f"dataset '{dataset}' has obs_dim {obs_dim} / act_dim {act_dim} but {env_id} has {obs_space.shape[0]} / "
             f"{space.shape[0]}; pass --env-id of the environment the data came from")
    if max_steps is None or max_steps > max_ep_len:
        fail(f"{env_id} episodes last up to {max_steps} steps, beyond the timestep embedding's --max-ep-len "
             f"{max_ep_len}; raise --max-ep-len (or use an env with a time limit)")
    return space.low.astype(np.float32), space.high.astype(np.float32), max_steps


# ----------------------------------------------------------------------------------------------------------------------
# Model: a GPT-style causal transformer over (R_t, s_t, a_t) tokens
# ----------------------------------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, embed_dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):  # x: (B, L, C)
        batch, length, channels = x.shape
        # (B, L, 3C) -> 3 x (B, L, H, C/H) -> 3 x (B, H, L, C/H)
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, channels // self.n_heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(C/H) + causal mask) v; the causal mask lets token i attend to tokens j <= i only.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(batch, length, channels)  # (B, H, L, C/H) -> (B, L, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    """GPT-2 block (pre-LayerNorm): x + Attn(LN(x)), then x + MLP(LN(x)); the official config uses a ReLU MLP."""

    def __init__(self, embed_dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.attn = CausalSelfAttention(embed_dim, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.ReLU(), nn.Linear(4 * embed_dim, embed_dim),
                                 nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
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
        # GPT-2's initialisation inside the transformer (the embeddings and head keep PyTorch's defaults, as in the
        # official code, where only the HuggingFace GPT-2 part is initialised this way).
        for name, parameter in self.blocks.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):  # residual outputs: 0.02 / sqrt(2 L)
                nn.init.normal_(parameter, 0.0, 0.02 / math.sqrt(2 * n_layers))
            elif name.endswith("weight") and parameter.dim() == 2:
                nn.init.normal_(parameter, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(parameter)

    def forward(self, states, actions, returns_to_go, timesteps):
        """states (B, T, obs_dim), actions (B, T, act_dim), returns_to_go (B, T, 1), timesteps (B, T) -> predicted
        actions (B, T, act_dim), where prediction t comes from the s_t token and so sees R_1..R_t, s_1..s_t and
        a_1..a_{t-1} only."""
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


def action_loss(model, states, actions, returns_to_go, timesteps, mask):
    """Mean-squared error on actions, over real (unpadded) steps only (Section 3, "Training", and Algorithm 1: MSE
    for continuous actions)."""
    predicted = model(states, actions, returns_to_go, timesteps)  # (B, K, act_dim)
    squared_error = ((predicted - actions) ** 2).mean(dim=-1)  # (B, K)
    return (squared_error * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: all episodes of all target returns in one vector env, one batched forward pass per step
# ----------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: DecisionTransformer, env_id: str, target_returns: list[float], episodes: int, seed: int,
             state_mean: np.ndarray, state_std: np.ndarray, reward_scale: float, context_len: int, max_steps: int,
             device: torch.device) -> np.ndarray:
    """Returns (len(target_returns), episodes). Episode i of every target resets with seed + i, so targets are
    compared on the same initial states, and every evaluation (in training or from a checkpoint) is reproducible."""
    model.eval()
    n_envs = len(target_returns) * episodes
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * n_envs)
    obs, _ = envs.reset(seed=[seed + i for _ in target_returns for i in range(episodes)])
    obs_dim, act_dim = obs.shape[1], envs.single_action_space.shape[0]
    low, high = envs.single_action_space.low, envs.single_action_space.high
    mean = torch.as_tensor(state_mean, device=device)
    std = torch.as_tensor(state_std, device=device)
    # Histories of every episode: (E, max_steps, ...). Row t holds s_t, a_t, R_t and t.
    states = torch.zeros(n_envs, max_steps, obs_dim, device=device)
    actions = torch.zeros(n_envs, max_steps, act_dim, device=device)
    rtg = torch.zeros(n_envs, max_steps, 1, device=device)
    timesteps = torch.arange(max_steps, device=device).expand(n_envs, max_steps)
    # R_1 = the target return (Section 3), scaled as in training.
    rtg[:, 0, 0] = torch.tensor(target_returns, device=device).repeat_interleave(episodes) / reward_scale
    returns = np.zeros(n_envs)
    active = np.ones(n_envs, dtype=bool)
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
        if t + 1 < max_steps:  # R_{t+1} = R_t - r_t (Section 3, Algorithm 1)
            scaled_rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device) / reward_scale
            rtg[:, t + 1, 0] = rtg[:, t, 0] - scaled_rewards
        active &= ~(terminated | truncated)  # a finished episode is not stepped by us again (its env autoresets)
        if not active.any():
            break
    envs.close()
    model.train()
    return returns.reshape(len(target_returns), episodes)


def normalized_score(mean_return: float, ref_scores) -> float:
    """DATASET.md: 100 (R - ref_min) / (ref_max - ref_min)."""
    return 100.0 * (mean_return - ref_scores[0]) / (ref_scores[1] - ref_scores[0])


def describe_returns(returns: np.ndarray, ref_scores) -> str:
    text = f"{returns.mean():.1f} +- {returns.std():.1f} over {len(returns)} episodes"
    if ref_scores is None:
        return text
    return f"{text} (normalized score {normalized_score(returns.mean(), ref_scores):.1f}, {ref_scores[2]})"


def atomic_write(path: str, write):
    """Write through `write(file)` into a temporary file beside `path`, then rename: a crash never leaves a
    half-written file under `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


MODEL_KEYS = ("context_len", "embed_dim", "n_layers", "n_heads", "dropout", "max_ep_len", "reward_scale")


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
    needed = ("args", "model", "global_step", "env_id", "state_mean", "state_std", "target_returns", "obs_dim",
              "act_dim")
    if checkpoint.get("version") != CHECKPOINT_VERSION or any(key not in checkpoint for key in needed) \
            or any(key not in checkpoint["args"] for key in MODEL_KEYS):
        fail(f"checkpoint '{path}' has format version {checkpoint.get('version')} or lacks fields this script reads "
             f"(version {CHECKPOINT_VERSION}); re-create it with this script's --save-model")
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------
def main(args: Args):
    validate_args(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    if args.eval_checkpoint:  # evaluation-only mode: everything comes from the checkpoint
        checkpoint = load_checkpoint(args.eval_checkpoint)
        for key in MODEL_KEYS:
            setattr(args, key, checkpoint["args"][key])
        env_id = args.env_id or checkpoint["env_id"]
        obs_dim, act_dim = int(checkpoint["obs_dim"]), int(checkpoint["act_dim"])
        state_mean, state_std = checkpoint["state_mean"].numpy(), checkpoint["state_std"].numpy()
        target_returns = args.target_returns or list(checkpoint["target_returns"])
        ref_scores = checkpoint.get("ref_scores")
        ref_scores = None if ref_scores is None else (*ref_scores[:2], checkpoint["ref_source"])
        low, high, max_steps = check_env(env_id, obs_dim, act_dim, args.max_ep_len, args.eval_checkpoint)
    else:
        data = load_dataset(args.dataset, args.download_dataset)
        env_id = args.env_id or data["env_id"]
        if env_id is None:
            fail(f"dataset '{args.dataset}' does not name its environment; pass --env-id (e.g. Hopper-v5)")
        obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
        low, high, max_steps = check_env(env_id, obs_dim, act_dim, args.max_ep_len, args.dataset)
        # States are normalised by the dataset's mean and std (+1e-6), in training and in evaluation.
        state_mean = data["observations"].mean(axis=0)
        state_std = data["observations"].std(axis=0) + 1e-6
        starts, ends = episode_bounds(data)
        episode_returns = np.add.reduceat(data["rewards"].astype(np.float64), starts)
        ref_scores = data["ref_scores"]
        if ref_scores is None and task_name(env_id) in D4RL_REF_SCORES:
            ref_scores = (*D4RL_REF_SCORES[task_name(env_id)], f"D4RL v2 references for {task_name(env_id)}")
        target_returns = args.target_returns or OFFICIAL_TARGET_RETURNS.get(task_name(env_id)) or [
            float(episode_returns.max()), float((episode_returns.max() + episode_returns.mean()) / 2)]
        buffer = SequenceBuffer(data, state_mean, state_std, args.reward_scale, args.max_ep_len, device)

    model = DecisionTransformer(obs_dim, act_dim, low, high, args.embed_dim, args.n_layers, args.n_heads,
                                args.dropout, args.max_ep_len).to(device)

    def run_evaluation(episodes):
        return evaluate(model, env_id, target_returns, episodes, args.seed + 10_000, state_mean, state_std,
                        args.reward_scale, args.context_len, max_steps, device)

    if args.eval_checkpoint:
        try:
            model.load_state_dict(checkpoint["model"])
        except (RuntimeError, KeyError) as error:
            fail(f"checkpoint '{args.eval_checkpoint}' does not match its own settings ({type(error).__name__}); "
                 "re-create it with --save-model")
        returns = run_evaluation(args.eval_episodes)
        for target, target_returns_ in zip(target_returns, returns):
            print(f"evaluation of {args.eval_checkpoint} (step {checkpoint['global_step']}) on {env_id}, target "
                  f"{target:g}: {describe_returns(target_returns_, ref_scores)}")
        return returns

    # AdamW on every parameter (the official code decays LayerNorm and biases too); linear warm-up, then constant.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / args.warmup_steps, 1.0))
    loss_fn = torch.compile(action_loss) if args.compile else action_loss
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed)

    run_name = f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs Weights & Biases: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=run_name, save_code=True)
    print(f"run {run_name}: {args.dataset} ({buffer.size} steps, {len(starts)} episodes, returns mean "
          f"{episode_returns.mean():.1f}, best {episode_returns.max():.1f}) -> {env_id}, device {device}, "
          f"{sum(p.numel() for p in model.parameters())} parameters, targets {[f'{t:g}' for t in target_returns]}")
    checkpoint_path = f"runs/{run_name}/{SCRIPT}.pt"

    def save_model(step):
        state = dict(script=SCRIPT, version=CHECKPOINT_VERSION, args=asdict(args), global_step=step,
                     model=model.state_dict(), optimizer=optimizer.state_dict(), env_id=env_id, obs_dim=obs_dim,
                     act_dim=act_dim, state_mean=torch.as_tensor(state_mean), state_std=torch.as_tensor(state_std),
                     target_returns=list(target_returns), ref_scores=None if ref_scores is None else ref_scores[:2],
                     ref_source=None if ref_scores is None else ref_scores[2])
        atomic_write(checkpoint_path, lambda file: torch.save(state, file))

    def log_evaluation(step):
        returns = run_evaluation(args.eval_episodes)
        for target, target_returns_ in zip(target_returns, returns):
            writer.add_scalar(f"eval/return_target_{target:g}", target_returns_.mean(), step)
            if ref_scores is not None:
                writer.add_scalar(f"eval/normalized_score_target_{target:g}",
                                  normalized_score(target_returns_.mean(), ref_scores), step)
            print(f"eval at step {step} (target {target:g}): {describe_returns(target_returns_, ref_scores)}")
        if args.save_model:
            save_model(step)
        return returns

    model.train()
    start_time = time.time()
    for step in range(1, args.total_steps + 1):
        states, actions, rtg, timesteps, mask = buffer.sample(args.batch_size, args.context_len, generator)
        loss = loss_fn(model, states, actions, rtg, timesteps, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()

        # Logging: the only host syncs of the training loop happen here, every --log-every steps.
        if step % args.log_every == 0 or step == args.total_steps:
            sps = step / (time.time() - start_time)
            writer.add_scalar("losses/action_mse", loss.item(), step)
            writer.add_scalar("charts/grad_norm", grad_norm.item(), step)
            writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
            writer.add_scalar("charts/SPS", sps, step)
            eta = (args.total_steps - step) / max(sps, 1e-8)
            eta_text = f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s"
            print(f"step {step}/{args.total_steps} | {sps:.0f} SPS | ETA {eta_text} | action mse {loss.item():.4f}",
                  flush=True)
        if step % args.eval_every == 0 and step != args.total_steps:
            log_evaluation(step)

    returns = log_evaluation(args.total_steps)
    for target, target_returns_ in zip(target_returns, returns):
        print(f"final evaluation (target {target:g}): {describe_returns(target_returns_, ref_scores)}")
    writer.close()
    return returns


if __name__ == "__main__":
    main(tyro.cli(Args))
