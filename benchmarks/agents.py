"""Released agents: small policy-only files cut from our training checkpoints, and their model cards.

    python benchmarks/agents.py release runs/<run>/td3_continuous.pt --name hopper-td3-1m \
        --command "python benchmarks/reproduce.py ..." --commit ff37194
    python benchmarks/agents.py card              # evaluate every agent in benchmarks/agents/, rewrite its README.md
    python td3_continuous.py --eval-checkpoint benchmarks/agents/hopper-td3-1m.pt --eval-episodes 100

An agent file is a checkpoint of its script (same `script`, `version`, `args`, `global_step`, `run_name` keys) that
holds the actor's weights and nothing else of training, plus `agent`: the env id, observation shape, action bounds,
the commit and command that trained it and the SHA-256 of the checkpoint it was cut from. The script's
evaluation-only mode (`--eval-checkpoint`) loads it like a full checkpoint; `--resume` refuses it with one line.

The card evaluates each agent through its script's own command line: 100 episodes of the deterministic policy (the
script's evaluation protocol: the evaluation env seeded seed + 10000 + episode), and the first 100 complete episodes of
the policy as it is sampled for data collection (`--export-rollouts`: SAC samples its Gaussian, TD3 adds its
N(0, exploration noise) to the action; the env seeded seed + 20000, as in `offline_suite.py`'s medium and expert sets,
whose first episodes these are).
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENTS = os.path.join(ROOT, "benchmarks", "agents")
SCRIPTS = ("sac_continuous", "td3_continuous")
REFS = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3),
        "ant": (-325.6, 3879.7)}  # D4RL's v2 (random, expert) returns, as in the scripts and docs/datasets.md
CARD_EPISODES = 100


def fail(message: str):
    raise SystemExit(f"agents.py: error: {message}")


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_save(obj, path: str):
    """torch.save to a temporary file beside `path`, fsync, rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def agent_from_checkpoint(checkpoint: dict, commit: str, command: str, source_sha256: str) -> dict:
    """The policy-only agent of a full training checkpoint (a dict as the scripts write it)."""
    if checkpoint.get("script") not in SCRIPTS or "actor" not in checkpoint:
        fail(f"not a checkpoint of {' or '.join(s + '.py' for s in SCRIPTS)} (script: {checkpoint.get('script')})")
    import gymnasium as gym

    env = gym.make(checkpoint["args"]["env_id"])
    agent = dict(script=checkpoint["script"], version=checkpoint["version"], args=checkpoint["args"],
                 global_step=int(checkpoint["global_step"]), run_name=checkpoint.get("run_name", ""),
                 actor={key: value.clone() for key, value in checkpoint["actor"].items()},
                 agent=dict(env_id=checkpoint["args"]["env_id"], observation_shape=list(env.observation_space.shape),
                            action_low=env.action_space.low.tolist(), action_high=env.action_space.high.tolist(),
                            commit=commit, command=command, checkpoint_sha256=source_sha256))
    env.close()
    return agent


def release(checkpoint_path: str, name: str, commit: str, command: str, folder: str = AGENTS) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        fail(f"--name {name!r}: use lower-case letters, digits and dashes, e.g. hopper-td3-1m")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"cannot read checkpoint {checkpoint_path} ({type(error).__name__}); give a .pt written by --save-model")
    if not isinstance(checkpoint, dict):
        fail(f"{checkpoint_path} is not a checkpoint of our scripts")
    path = os.path.join(folder, f"{name}.pt")
    atomic_save(agent_from_checkpoint(checkpoint, commit, command, sha256(checkpoint_path)), path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB): {checkpoint['script']} on "
          f"{checkpoint['args']['env_id']} after {checkpoint['global_step']} steps")
    return path


def episode_returns(data: dict) -> np.ndarray:
    """Returns of the complete episodes (ended by a termination or a time limit) of a docs/datasets.md array dict."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    sums = np.cumsum(np.asarray(data["rewards"], np.float64))
    return np.diff(np.r_[0.0, sums[ends]])


def normalized(value: float, env_id: str) -> float | None:
    """D4RL's normalized score of a return on a locomotion task (v2 references), None for other tasks."""
    refs = REFS.get(env_id.split("-v")[0].lower())
    return None if refs is None else 100.0 * (value - refs[0]) / (refs[1] - refs[0])


def rollout_command(agent_path: str, agent: dict, episodes: int, out: str, steps: int) -> list:
    """The script's evaluation-only command that also writes `steps` sampled steps of the agent to `out`."""
    command = [sys.executable, os.path.join(ROOT, agent["script"] + ".py"), "--eval-checkpoint", agent_path,
               "--eval-episodes", str(episodes), "--export-rollouts", out, "--export-rollout-steps", str(steps),
               "--no-cuda"]
    if agent["script"] == "td3_continuous":  # data collection uses the noise the agent was trained with
        command += ["--exploration-noise", str(agent["args"]["exploration_noise"])]
    return command


def evaluate_agent(path: str, episodes: int = CARD_EPISODES) -> dict:
    agent = torch.load(path, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rollouts.npz")
        steps = episodes * 1000  # 1000-step episodes at most: at least `episodes` complete ones
        result = subprocess.run(rollout_command(path, agent, episodes, out, steps), capture_output=True, text=True,
                                cwd=folder)
        if result.returncode != 0:
            fail(f"evaluating {path} failed: {(result.stderr or result.stdout).strip().splitlines()[-1]}")
        match = re.search(r": (-?[\d.]+) \+- ([\d.]+) over (\d+) episodes", result.stdout)
        if match is None:
            fail(f"evaluating {path} printed no evaluation line; its output: {result.stdout.strip()[-200:]}")
        with np.load(out) as data:
            sampled = episode_returns(dict(data))[:episodes]
    env_id = agent["args"]["env_id"]
    det_mean, det_std = float(match.group(1)), float(match.group(2))
    return dict(name=os.path.basename(path).removesuffix(".pt"), script=agent["script"] + ".py", env_id=env_id,
                seed=agent["args"]["seed"], steps=agent["global_step"], deterministic_mean=det_mean,
                deterministic_std=det_std, deterministic_normalized=normalized(det_mean, env_id),
                sampled_mean=float(sampled.mean()), sampled_std=float(sampled.std()),
                sampled_normalized=normalized(float(sampled.mean()), env_id), sampled_episodes=len(sampled),
                commit=agent["agent"]["commit"], command=agent["agent"]["command"], sha256=sha256(path),
                size_kb=round(os.path.getsize(path) / 1024))


CARD_HEADER = """# Released agents

Policy-only files (the actor's weights, the run's settings, the env's shapes and action bounds, the commit and
command that trained it), cut from our training checkpoints by `python benchmarks/agents.py release`. Each loads with
its script's evaluation-only mode:

```bash
python td3_continuous.py --eval-checkpoint benchmarks/agents/hopper-td3-1m.pt --eval-episodes 100
python sac_continuous.py --eval-checkpoint benchmarks/agents/hopper-sac-medium.pt --eval-episodes 100 \\
    --export-rollouts hopper-medium.npz --export-rollout-steps 1000000   # D4RL-style rollouts of the policy
```

The medium (`-sac-medium`) and expert (`-td3-1m`) agents make the offline suite (`benchmarks/offline_suite.py`,
docs/datasets.md). This table is written by `python benchmarks/agents.py card` ({machine}; an agent whose file is unchanged keeps
its row): the deterministic policy
over {episodes} episodes (the scripts' evaluation protocol), and the first {episodes} complete episodes of the policy as
sampled for data collection (SAC: its Gaussian; TD3: its N(0, 0.1) exploration noise), mean +- std of the return,
normalized with D4RL's v2 references. CPU floating point differs between machines, so another CPU may give other
digits.

| agent | script | env | training steps (seed) | deterministic, {episodes} episodes | sampled, {episodes} episodes | trained by (commit) | size | sha256 |
|---|---|---|---|---|---|---|---|---|
"""


def card(folder: str = AGENTS, machine: str = "", episodes: int = CARD_EPISODES) -> list:
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".pt"))
    if not paths:
        fail(f"no agent files (*.pt) in {folder}")
    def returns(c: dict, kind: str) -> str:  # mean +- std (normalized)
        score = c[f"{kind}_normalized"]
        return f"{c[f'{kind}_mean']:.1f} +- {c[f'{kind}_std']:.1f}" + ("" if score is None else f" ({score:.1f})")

    cards_path = os.path.join(folder, "cards.json")
    known = {(c["name"], c["sha256"], c["sampled_episodes"]): c
             for c in (json.load(open(cards_path)) if os.path.exists(cards_path) else [])}
    cards = []
    for path in paths:  # an agent whose file and episode count are unchanged keeps its card
        name, digest = os.path.basename(path).removesuffix(".pt"), sha256(path)
        cards.append(known.get((name, digest, episodes)) or evaluate_agent(path, episodes))
        print(f"{cards[-1]['name']}: deterministic {returns(cards[-1], 'deterministic')}, "
              f"sampled {returns(cards[-1], 'sampled')}", flush=True)
    lines = [CARD_HEADER.format(machine=machine or "machine not given", episodes=episodes)]
    for c in cards:
        lines.append(f"| `{c['name']}` | {c['script']} | {c['env_id']} | {c['steps']} ({c['seed']}) | "
                     f"{returns(c, 'deterministic')} | {returns(c, 'sampled')} | {c['commit']} | {c['size_kb']} KB | "
                     f"`{c['sha256'][:16]}` |\n")
    lines.append("\nThe commands that trained them:\n\n")
    lines += [f"- `{c['name']}`: `{c['command']}`\n" for c in cards]
    text = "".join(lines)
    for path, content in [(os.path.join(folder, "README.md"), text), (cards_path, json.dumps(cards, indent=1) + "\n")]:
        with open(path + ".tmp", "w") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(path + ".tmp", path)
    print(f"wrote {os.path.join(folder, 'README.md')} and cards.json")
    return cards


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="action", required=True)
    cut = commands.add_parser("release", help="cut a policy-only agent file from a training checkpoint")
    cut.add_argument("checkpoint")
    cut.add_argument("--name", required=True, help="file name without .pt, e.g. hopper-td3-1m")
    cut.add_argument("--commit", required=True, help="the commit of the scripts that trained it")
    cut.add_argument("--command", required=True, help="the command that trained it")
    cut.add_argument("--folder", default=AGENTS)
    cards = commands.add_parser("card", help="evaluate every agent and rewrite the folder's README.md")
    cards.add_argument("--folder", default=AGENTS)
    cards.add_argument("--machine", default="", help="the CPU, date and commit, for the README's header")
    cards.add_argument("--episodes", type=int, default=CARD_EPISODES, help="episodes of each evaluation")
    args = parser.parse_args(argv)
    if args.action == "release":
        release(args.checkpoint, args.name, args.commit, args.command, args.folder)
    else:
        card(args.folder, args.machine, args.episodes)


if __name__ == "__main__":
    main()
