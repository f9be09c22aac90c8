"""Sampling speed of decision_diffuser.py: DDPM over all K steps versus DDIM with 20 and 10 steps, on the same model.

Trains the small configuration on a Pendulum-v1 dataset (or loads --checkpoint), then evaluates the same EMA weights
with each sampler: milliseconds per batched planning step (one plan for all --eval-episodes envs, plus the inverse
dynamics) and evaluation return. Also reports training optimiser steps per second. Prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/diffuser_sampling.py --dataset data/pendulum.npz --make-pendulum-dataset
    OMP_NUM_THREADS=1 python benchmarks/diffuser_sampling.py --checkpoint runs/<run>/decision_diffuser.pt
    OMP_NUM_THREADS=1 python benchmarks/diffuser_sampling.py --faithful-cost   # the released configuration's cost
"""

import argparse
import contextlib
import glob
import io
import os
import re
import sys
import time

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import decision_diffuser as dd  # noqa: E402  (benchmarks may import the script as a module)

SMALL = dict(horizon=16, dim=32, dim_mults=(1, 2), n_diffusion_steps=200, total_steps=2000, batch_size=64,
             gradient_accumulate_every=1, ema_start=500, learning_rate=1e-3, normalizer="limits", sampler="ddim",
             sampling_steps=10)


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
    """The tests' Pendulum-v1 set (docs/datasets.md layout): episodes of the controller (return about -130), of the
    controller with half its actions random (about -400) and of uniform random actions (about -1170)."""
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
    np.savez(path, env_id=np.array("Pendulum-v1"), source=np.array("benchmarks: swing-up controller"), **data)
    return np.array(episode_returns)


def faithful_cost(obs_dim: int = 17, act_dim: int = 6, repeats: int = 3, device: str = "cpu"):
    """Seconds per training step and per guided forward pass of the released configuration (about 60M parameters,
    horizon 100, batch 32 x 2), with HalfCheetah's dimensions and random data: what 1M steps would cost here."""
    torch.manual_seed(0)
    args = dd.Args(dataset="random")
    nets = torch.nn.ModuleDict(dict(
        unet=dd.TemporalUnet(obs_dim, args.horizon, args.dim, args.dim_mults, args.kernel_size),
        inverse_dynamics=dd.inverse_dynamics_mlp(obs_dim, act_dim, args.inv_hidden_dim))).to(device)
    schedule = dd.CosineSchedule(args.n_diffusion_steps).to(device)
    optimizer = torch.optim.Adam(nets.parameters(), lr=args.learning_rate)
    batch = args.batch_size * args.gradient_accumulate_every
    states = torch.rand(batch, args.horizon, obs_dim, device=device) * 2 - 1
    actions = torch.rand(batch, args.horizon, act_dim, device=device) * 2 - 1
    valid = torch.ones(batch, args.horizon, dtype=torch.bool, device=device)
    returns = torch.rand(batch, 1, device=device)
    wait = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # time finished work, not queued kernels

    def train_step():
        loss, _, _ = dd.loss_fn(nets, schedule, states, actions, valid, returns, args.condition_dropout)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_step()  # warm-up
    wait()
    start = time.perf_counter()
    for _ in range(repeats):
        train_step()
    wait()
    train = (time.perf_counter() - start) / repeats
    x, k = torch.randn(10, args.horizon, obs_dim, device=device), torch.full((10,), 5, device=device)
    y = torch.full((10, 1), args.test_return, device=device)
    with torch.no_grad():
        dd.guided_epsilon(nets.unet, x, k, y, args.guidance_weight)
        wait()
        start = time.perf_counter()
        for _ in range(repeats):
            dd.guided_epsilon(nets.unet, x, k, y, args.guidance_weight)
        wait()
        forward = (time.perf_counter() - start) / repeats
    print(f"released configuration: {sum(p.numel() for p in nets.unet.parameters()) / 1e6:.1f}M U-Net parameters; "
          f"{1000 * train:.1f} ms per training step (batch {batch}), 1M steps = {train * 1e6 / 3600:.1f} hours; "
          f"one guided pass for 10 envs (batch 20) {1000 * forward:.1f} ms, so per env step "
          f"DDPM-{args.n_diffusion_steps} {args.n_diffusion_steps * forward:.1f} s and DDIM-20 {20 * forward:.2f} s "
          f"(torch threads {torch.get_num_threads()}; {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; "
          f"{repeats} repeats)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="a .npz (docs/datasets.md) to train the small configuration on")
    parser.add_argument("--make-pendulum-dataset", action="store_true",
                        help="first write --dataset with the tests' Pendulum-v1 controller/noisy/random episodes")
    parser.add_argument("--checkpoint", help="a decision_diffuser.pt to benchmark instead of training")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faithful-cost", action="store_true",
                        help="only time the released configuration's training step and guided forward pass")
    parser.add_argument("--cuda", action="store_true", help="with --faithful-cost: time it on the GPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of --faithful-cost")
    options = parser.parse_args()
    if options.faithful_cost:
        return faithful_cost(repeats=options.repeats, device="cuda" if options.cuda else "cpu")
    if not (options.dataset or options.checkpoint):
        parser.error("give --dataset (train the small configuration first) or --checkpoint")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    if options.make_pendulum_dataset:
        os.makedirs(os.path.dirname(os.path.abspath(options.dataset)), exist_ok=True)
        pendulum_dataset(options.dataset)
    train_sps = None
    checkpoint = options.checkpoint
    if checkpoint is None:
        args = dd.Args(dataset=options.dataset, seed=options.seed, cuda=False, save_model=True, eval_episodes=1,
                       eval_every=10**9, log_every=500, **SMALL)
        start = time.time()
        dd.main(args)
        elapsed = time.time() - start
        checkpoint = max(glob.glob("runs/*/decision_diffuser.pt"), key=os.path.getmtime)
        train_sps = SMALL["total_steps"] / elapsed  # includes data preparation and one 1-episode evaluation
    n_steps = torch.load(checkpoint, weights_only=True)["args"]["n_diffusion_steps"]

    rows = []
    for sampler, steps in [("ddpm", n_steps), ("ddim", 20), ("ddim", 10)]:
        args = dd.Args(eval_checkpoint=checkpoint, eval_episodes=options.eval_episodes, seed=options.seed,
                       cuda=False, sampler=sampler, sampling_steps=min(steps, n_steps))
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            returns = dd.main(args)
        # the script's own measurement: mean time of one batched plan (+ inverse dynamics) over the evaluation
        ms = float(re.search(r"([0-9.]+) ms per planning step", output.getvalue()).group(1))
        rows.append((f"{sampler.upper()}-{steps}", ms, ms / len(returns), returns.mean(), returns.std()))
        print(f"{rows[-1][0]}: {ms:.1f} ms per batched plan, return {returns.mean():.1f}", flush=True)

    print(f"\ncheckpoint: {checkpoint}; {options.eval_episodes} envs planned in one batch; "
          f"torch threads {torch.get_num_threads()}")
    if train_sps is not None:
        print(f"training: {train_sps:.1f} optimiser steps/s (batch 64, small configuration, incl. set-up)")
    print("\n| sampler | ms per batched plan step | ms per action (per env) | eval return (mean +- std) |")
    print("| --- | --- | --- | --- |")
    for name, ms_batch, ms_action, mean, std in rows:
        print(f"| {name} | {ms_batch:.1f} | {ms_action:.1f} | {mean:.1f} +- {std:.1f} |")


if __name__ == "__main__":
    main()
