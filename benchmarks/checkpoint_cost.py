"""What a SAC/TD3 checkpoint costs at the papers' budget: HalfCheetah-v5 (obs 17, actions 6), a full replay buffer of
1M transitions, default networks, a checkpoint every 10k steps (the default --eval-every of the 1M runs).

    python benchmarks/checkpoint_cost.py [--script td3_continuous.py] [--repeats 5]

It builds the script's own ReplayBuffer, networks and optimisers (one update, so Adam's moments exist), writes the
chunks of the first 990k transitions once, then times `save_checkpoint` at step 1M (what the run pays every 10k
steps: the 10k new rows and the rest) and the replay part of resuming (`load_replay`, all 100 chunks). Prints the
times and the sizes on disk."""

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
import time

import gymnasium as gym
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="sac_continuous.py", choices=["sac_continuous.py", "td3_continuous.py"])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    sys.path.insert(0, ROOT)
    module = importlib.import_module(options.script.removesuffix(".py"))
    torch.manual_seed(0)
    env, args = gym.make("HalfCheetah-v5"), module.Args(env_id="HalfCheetah-v5", cuda=False)
    obs_dim, act_dim, steps, every = 17, 6, 1_000_000, 10_000
    rb = module.ReplayBuffer(steps, obs_dim, act_dim, torch.device("cpu"))
    rb.rows.uniform_(-1, 1)
    rb.position, rb.size = 0, steps
    sizes = args.hidden_dim if hasattr(args, "hidden_dim") else args.hidden_dims
    actor = module.Actor(obs_dim, act_dim, sizes, *((args.log_std_min, args.log_std_max) if options.script.startswith(
        "sac") else ()))
    qf = module.TwinQNetwork(obs_dim, act_dim, sizes)
    state = dict(actor=actor, qf=qf, q_optimizer=torch.optim.Adam(qf.parameters()),
                 actor_optimizer=torch.optim.Adam(actor.parameters()))
    loss = qf(torch.zeros(1, obs_dim), torch.zeros(1, act_dim)).sum() + actor(torch.zeros(1, obs_dim))[0].sum()
    loss.backward()
    state["q_optimizer"].step(), state["actor_optimizer"].step()
    with tempfile.TemporaryDirectory(dir=ROOT) as folder:
        path = os.path.join(folder, "checkpoint.pt")
        for count in range(every, steps, every):  # the chunks of earlier checkpoints
            module.save_replay(rb, os.path.join(folder, "replay"), count)
        saves, loads = [], []
        for _ in range(options.repeats):
            with contextlib.suppress(FileNotFoundError):  # the last chunk is written anew each time
                os.remove(os.path.join(folder, "replay", f"{steps - every}-{steps}.pt"))
            start = time.perf_counter()
            module.save_checkpoint(path, args, steps, state, rb, env, run_name="cost", metrics={}, recent_returns=[])
            saves.append(time.perf_counter() - start)
            checkpoint = torch.load(path, weights_only=True)
            start = time.perf_counter()
            module.load_replay(rb, checkpoint, os.path.join(folder, "replay"), os.path.join(folder, "replay"))
            loads.append(time.perf_counter() - start)
        replay = sum(os.path.getsize(os.path.join(folder, "replay", name)) for name in checkpoint["replay"])
        print(f"{options.script}, HalfCheetah-v5, 1M transitions ({len(checkpoint['replay'])} chunks of {every}):")
        print(f"  checkpoint every {every} steps: {min(saves) * 1000:.0f} ms (min of {options.repeats}; all: "
              f"{', '.join(f'{s * 1000:.0f}' for s in saves)} ms), writing {os.path.getsize(path) / 1e6:.1f} MB "
              f"(networks, optimisers, generators) + {replay / len(checkpoint['replay']) / 1e6:.2f} MB (new rows)")
        print(f"  on disk: {os.path.getsize(path) / 1e6:.1f} MB + replay/ {replay / 1e6:.1f} MB")
        print(f"  resuming, the replay buffer: {min(loads):.2f} s (min of {options.repeats})")


if __name__ == "__main__":
    main()
