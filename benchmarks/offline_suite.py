"""D4RL's MuJoCo recipe on Gymnasium v5: medium, medium-replay, expert and medium-expert sets for Hopper, HalfCheetah
and Walker2d, made from our released agents (benchmarks/agents/) in one command.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/offline_suite.py --output-dir ~/offline_v5
    python decision_transformer.py --dataset rlref/hopper/medium-v0          # by Minari id, or by path:
    python decision_transformer.py --dataset ~/offline_v5/hopper-medium-v0.npz

Per task (docs/datasets.md, "The v5 offline suite", says where and why we depart from D4RL):
  * medium-replay: every transition of the SAC run that made the medium agent, from its first step to the step the
    agent was cut at (N), in order. The stage reruns that run through `sac_continuous.py` with the agent's own
    settings and seed, `--total-timesteps N --save-model` (so a killed stage resumes exactly with `--resume`), and
    reads its replay buffer from the final checkpoint; a checkpoint of the same run at step N already in
    OUTPUT/work/TASK-medium-run/runs/*/ (for example one taken from a longer run) is used as it is. It then checks that
    the rerun's policy is the released one, bit for bit (the same CPU kind gives the same bytes; another may not).
  * medium: `--steps` steps (1M, as D4RL) of the medium agent's sampled policy, through the script's own
    `--eval-checkpoint AGENT --export-rollouts`, 1000-step episodes (the v5 envs' time limit).
  * expert: the same from the expert agent (`TASK-td3-1m`: TD3's actions with its N(0, 0.1) exploration noise; D4RL
    sampled an SAC policy).
  * medium-expert: medium up to its last complete episode, then expert, row for row, as D4RL's stitch_dataset.py
    (medium's last episode, cut by the end of collection, would otherwise run into expert's first).
Each set is written as an .npz in the docs/datasets.md layout (OUTPUT/TASK-SET-vV.npz) and as a local Minari dataset
`NAMESPACE/TASK/SET-vV` with D4RL's v2 reference scores in its metadata (so `minari.get_normalized_score` works), in
$MINARI_DATASETS_PATH (default ~/.minari/datasets). A progress line per set; at the end a summary table (transitions,
episodes, mean / best / worst return of the complete episodes, D4RL's normalized score x 100, D4RL's v2 figures beside
them) of every set made in OUTPUT so far, in OUTPUT/summary.md and summary.json, with each file's SHA-256. A set whose
file is there, unchanged and made from the same inputs (agent files, --steps; for medium-expert, the two sets), as
OUTPUT/manifest.json records, is skipped, and so is its Minari dataset if it is in place; so a rerun after a kill
picks up where it stopped; `--force` makes every set again.
"""

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import agents as released  # noqa: E402  (agent files, their rollouts and episode returns)

ROOT = released.ROOT
TASKS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
SETS = ("medium-replay", "medium", "expert", "medium-expert")
# Settings of a run that do not change its transitions, or that the stage sets itself.
RUN_CONTROL = {"resume", "eval_checkpoint", "eval_seed", "export_replay", "export_minari", "export_rollouts",
               "export_rollouts_minari", "export_rollout_steps", "export_rollout_deterministic", "total_timesteps",
               "save_model", "checkpoint_every", "track", "wandb_project_name", "wandb_entity", "capture_video",
               "cuda", "compile", "log_every"}
def task_name(env_id: str) -> str:
    """hopper for Hopper-v5: the name in agent files, data files and Minari ids."""
    return env_id.split("-v")[0].lower()


# D4RL's v2 sets, for comparison: (episodes, mean, best, worst return). Episodes: the TensorFlow Datasets catalog
# (d4rl_mujoco_*, which also counts a set's cut last episode); returns: the Decision Transformer's dataset statistics
# (complete episodes) as printed by its gym/experiment.py on the v2 files. medium-expert's are not published.
D4RL_V2 = {("hopper", "medium"): (2187, 1422.06, 3222.36, 315.87),
           ("hopper", "medium-replay"): (2041, 467.30, 3192.93, -1.44),
           ("hopper", "expert"): (1028, 3511.36, 3759.08, 1645.28),
           ("hopper", "medium-expert"): (3214, None, None, None),
           ("halfcheetah", "medium"): (1000, 4770.33, 5309.38, -310.23),
           ("halfcheetah", "medium-replay"): (202, 3093.29, 4985.14, -638.49),
           ("halfcheetah", "expert"): (1000, 10656.43, 11252.04, 2045.83),
           ("halfcheetah", "medium-expert"): (2000, None, None, None),
           ("walker2d", "medium"): (1191, 2852.09, 4226.94, -6.61),
           ("walker2d", "medium-replay"): (1093, 682.70, 4132.00, -50.20),
           ("walker2d", "expert"): (1001, 4920.51, 5011.69, 763.42),
           ("walker2d", "medium-expert"): (2191, None, None, None)}
KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def fail(message: str):
    raise SystemExit(f"offline_suite.py: error: {message}")


def load_agent(folder: str, name: str) -> tuple[str, dict]:
    path = os.path.abspath(os.path.join(folder, f"{name}.pt"))
    if not os.path.isfile(path):
        fail(f"no agent {path}; release one with `python benchmarks/agents.py release` (benchmarks/agents/README.md)")
    try:
        agent = torch.load(path, map_location="cpu", weights_only=True)
        agent["args"]["env_id"], agent["actor"], agent["global_step"]  # noqa: B018  (the keys every agent has)
    except Exception as error:
        fail(f"cannot read agent {path} ({type(error).__name__}); it is corrupt or not an agent file: restore it with "
             f"`git checkout {os.path.relpath(path, ROOT)}`")
    return path, agent


def write_npz(path: str, data: dict):
    """np.savez into a temporary file beside `path`, fsync, rename."""
    temporary = f"{path}.tmp{os.getpid()}.npz"
    try:
        np.savez(temporary, **data)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_npz(path: str) -> dict:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def run(command: list, cwd: str, log: str):
    """Run a script's command line with its output appended to `log`; a failure stops the suite with its last line."""
    os.makedirs(cwd, exist_ok=True)
    with open(log, "a") as file:
        file.write(f"$ {' '.join(command)}\n")
        file.flush()
        result = subprocess.run(command, cwd=cwd, stdout=file, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log) as file:
            last = file.read().strip().splitlines()[-1]
        fail(f"`{' '.join(command[1:3])} ...` failed ({last}); its log: {log}")


def cli_flags(args: dict) -> list:
    """The training settings of a run's saved args as command-line flags of its script."""
    flags = []
    for key, value in args.items():
        if key in RUN_CONTROL or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def find_checkpoint(folder: str, script: str):
    paths = glob.glob(os.path.join(folder, "runs", "*", f"{script}.pt"))
    if len(paths) > 1:
        fail(f"{folder} holds {len(paths)} runs; keep one")
    if not paths:
        return None, None
    try:
        return paths[0], torch.load(paths[0], map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"cannot read {paths[0]} ({type(error).__name__}); remove {folder} to rerun the medium run")


def medium_run(task: str, agent_path: str, agent: dict, work: str, log: str) -> tuple[str, dict]:
    """The checkpoint at step N of the SAC run that made the medium agent: found, resumed or rerun."""
    script, steps = agent["script"], agent["global_step"]
    path, checkpoint = find_checkpoint(work, script)
    if checkpoint is not None:
        same_run(path, checkpoint, agent_path, agent, work)
    if checkpoint is not None and checkpoint["global_step"] > steps:
        fail(f"{path} is at step {checkpoint['global_step']}, past the medium agent's {steps}; remove {work}")
    if checkpoint is None:
        run([sys.executable, os.path.join(ROOT, f"{script}.py"), *cli_flags(agent["args"]), "--total-timesteps",
             str(steps), "--save-model", "--no-cuda"], work, log)
    elif checkpoint["global_step"] < steps:
        run([sys.executable, os.path.join(ROOT, f"{script}.py"), "--resume", path, "--total-timesteps", str(steps),
             "--save-model", "--no-cuda"], work, log)
    path, checkpoint = find_checkpoint(work, script)
    if checkpoint is None or checkpoint["global_step"] != steps:
        fail(f"the medium run in {work} did not reach step {steps}; see {log}")
    same_run(path, checkpoint, agent_path, agent, work)
    return path, checkpoint


def same_run(path: str, checkpoint: dict, agent_path: str, agent: dict, work: str):
    differ = [key for key, value in agent["args"].items()
              if key not in RUN_CONTROL and checkpoint["args"].get(key) != value]
    if checkpoint.get("script") != agent["script"] or differ:
        fail(f"{path} is not the run of {agent_path}: its {', '.join(differ) or 'script'} differ; remove {work}")


def replay_rows(path: str, checkpoint: dict) -> torch.Tensor:
    """Transitions [0, N) of a checkpoint's replay buffer, in order (its chunk files `replay/{first}-{end}.pt`)."""
    steps, rows, expected = checkpoint["global_step"], [], 0
    for name in checkpoint["replay"]:
        first, end = map(int, name.removesuffix(".pt").split("-"))
        if first != expected:
            fail(f"{path}'s replay buffer does not start at step 0 or has a gap at {expected} (a run longer than its "
                 "buffer overwrote its first transitions)")
        try:
            rows.append(torch.load(os.path.join(os.path.dirname(path), "replay", name), map_location="cpu",
                                   weights_only=True))
        except (OSError, RuntimeError) as error:
            fail(f"cannot read {path}'s replay chunk {name} ({type(error).__name__}); a checkpoint needs its replay/ "
                 "folder beside it")
        expected = end
    rows = torch.cat(rows)
    if len(rows) < steps:
        fail(f"{path}'s replay buffer holds {len(rows)} transitions, not {steps}")
    return rows[:steps]


def replay_dataset(rows: torch.Tensor, env_id: str, source: str) -> dict:
    """The docs/datasets.md arrays of replay rows [obs, action in [-1, 1], reward, terminated, next_obs] (the SAC and
    TD3 scripts' buffer layout), actions mapped to the env's units as the scripts map them, episode ends recovered:
    a termination is stored; a non-terminal end is where the next row does not start from this row's next
    observation (a reset), which must be the env's time limit."""
    import gymnasium as gym

    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high, limit = env.action_space.low, env.action_space.high, env.spec.max_episode_steps
    env.close()
    rows = rows.numpy()
    obs, action = rows[:, :obs_dim], rows[:, obs_dim:obs_dim + act_dim]
    reward, terminal = rows[:, obs_dim + act_dim], rows[:, obs_dim + act_dim + 1] > 0.5
    next_obs = rows[:, obs_dim + act_dim + 2:]
    reset = np.r_[np.any(next_obs[:-1] != obs[1:], axis=1), False]  # the next row starts a new episode
    timeout = reset & ~terminal
    ends = np.flatnonzero(terminal | timeout)
    lengths = np.diff(np.r_[-1, ends])
    if np.any(terminal[:-1] & ~reset[:-1]) or np.any(lengths[~terminal[ends]] != limit):
        fail("the replay buffer's episode ends do not match the env's time limit; it is not one run's buffer")
    last = len(rows) - 1 - (ends[-1] if len(ends) else -1)  # length of the episode at the end of the buffer
    timeout[-1] = not terminal[-1] and last == limit  # else: unfinished, neither flag (docs/datasets.md)
    refs = released.REFS.get(task_name(env_id))
    return dict(observations=obs.copy(), actions=(low + 0.5 * (action + 1.0) * (high - low)).astype(np.float32),
                rewards=reward.copy(), next_observations=next_obs.copy(), terminals=terminal, timeouts=timeout,
                env_id=np.array(env_id), source=np.array(source),
                **({} if refs is None else dict(ref_min_score=np.array(refs[0]), ref_max_score=np.array(refs[1]))))


def concatenate(first: dict, second: dict, source: str) -> dict:
    """`first` up to its last complete episode, then all of `second`, row for row (D4RL's stitch_dataset.py): the
    episode that the end of collection cut in `first` is dropped, so that it cannot run into `second`'s first."""
    ends = np.flatnonzero(first["terminals"] | first["timeouts"])
    keep = ends[-1] + 1 if len(ends) else 0
    data = {key: np.concatenate([first[key][:keep], second[key]]) for key in KEYS}
    return dict(data, env_id=first["env_id"], source=np.array(source),
                **{key: first[key] for key in ("ref_min_score", "ref_max_score") if key in first})


def statistics(data: dict) -> dict:
    """Transitions, episodes and the returns of the complete episodes, raw and normalized (D4RL's v2 references)."""
    returns = released.episode_returns(data)
    env_id = str(data["env_id"])
    stats = dict(transitions=len(data["rewards"]), episodes=len(returns),
                 terminations=int(data["terminals"].sum()), timeouts=int(data["timeouts"].sum()))
    for name, reduce in [("mean", np.mean), ("best", np.max), ("worst", np.min)]:
        value = float(reduce(returns)) if len(returns) else None
        stats[f"{name}_return"] = value
        stats[f"{name}_normalized"] = None if value is None else released.normalized(value, env_id)
    return stats


def code_version() -> str:
    """This checkout's git commit (-dirty with uncommitted changes), for the datasets' metadata."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, check=True, timeout=10, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not in a git checkout)"


def write_minari(dataset_id: str, data: dict, author: str, algorithm: str):
    """The set as a local Minari dataset, through Minari's own API: one Minari episode per episode (N + 1
    observations), terminations and truncations kept apart, an unfinished last episode stored as truncated (as
    Minari's DataCollector does), D4RL's references in the metadata. Built in a staging folder, then renamed in."""
    import minari
    from minari.data_collector import EpisodeBuffer
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.namespace import create_namespace, list_local_namespaces
    from minari.storage import get_dataset_path

    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    if len(ends) == 0 or ends[-1] != len(data["rewards"]):
        ends = np.append(ends, len(data["rewards"]))
    episodes = []
    for index, (start, end) in enumerate(zip(np.r_[0, ends[:-1]], ends)):
        truncations = data["timeouts"][start:end].copy()
        truncations[-1] |= not data["terminals"][end - 1]
        episodes.append(EpisodeBuffer(id=index, observations=np.concatenate(
            [data["observations"][start:end], data["next_observations"][end - 1:end]]),
            actions=data["actions"][start:end], rewards=data["rewards"][start:end],
            terminations=data["terminals"][start:end], truncations=truncations))
    root, target = get_dataset_path(), get_dataset_path(dataset_id)
    if os.path.exists(target):
        shutil.rmtree(target)
    staging, saved = tempfile.mkdtemp(prefix=".staging-", dir=root), os.environ.get("MINARI_DATASETS_PATH")
    env_id = str(data["env_id"])
    try:
        os.environ["MINARI_DATASETS_PATH"] = staging
        minari.create_dataset_from_buffers(
            dataset_id, episodes, env=env_id, eval_env=env_id, algorithm_name=algorithm, author=author,
            author_email="-", code_permalink=f"benchmarks/offline_suite.py at git commit {code_version()}",
            ref_min_score=float(data["ref_min_score"]) if "ref_min_score" in data else None,
            ref_max_score=float(data["ref_max_score"]) if "ref_max_score" in data else None,
            description=f"{data['source']}. Made by benchmarks/offline_suite.py (docs/datasets.md, 'The v5 offline "
                        "suite'). An episode still running when collection stopped is stored as truncated.")
        os.environ["MINARI_DATASETS_PATH"] = str(root)
        namespace = parse_dataset_id(dataset_id)[0]
        if namespace is not None and namespace not in list_local_namespaces():
            create_namespace(namespace)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(staging, dataset_id), target)
    finally:
        if saved is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = saved
        shutil.rmtree(staging, ignore_errors=True)


def atomic_text(path: str, text: str):
    with open(path + ".tmp", "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(path + ".tmp", path)


def read_manifest(path: str) -> dict:
    """OUTPUT/manifest.json: per set, its file's SHA-256, what it was made from (inputs), its statistics."""
    if not os.path.exists(path):
        return {}
    try:
        return json.load(open(path))
    except (OSError, ValueError) as error:
        fail(f"cannot read {path} ({type(error).__name__}); remove it (or pass --force) to make every set again")


def write_manifest(path: str, manifest: dict):
    atomic_text(path, json.dumps(manifest, indent=1))


def minari_exists(dataset_id: str) -> bool:
    from minari.storage import get_dataset_path

    return os.path.isdir(os.path.join(get_dataset_path(dataset_id), "data"))


def sha256(path: str) -> str:
    return released.sha256(path)


def cpu_name() -> str:
    """The CPU model as lscpu names it (RESULTS names the machine with every figure)."""
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def summary_table(rows: list) -> str:
    lines = ["| task | set | transitions | episodes | mean return (normalized) | best | worst | D4RL v2: episodes, "
             "mean return (normalized) | minutes | sha256 of the .npz |", "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value, env_id):
        score = None if value is None else released.normalized(value, env_id)
        return "-" if value is None else f"{value:.1f}" + ("" if score is None else f" ({score:.1f})")

    for r in rows:
        env_id = TASKS.get(r["task"], r["task"])
        d4rl = D4RL_V2.get((r["task"], r["set"]))
        theirs = "-" if d4rl is None else f"{d4rl[0]}, {cell(d4rl[1], env_id)}"
        lines.append(f"| {r['task']} | {r['set']} | {r['transitions']} | {r['episodes']} | "
                     f"{cell(r['mean_return'], env_id)} | {cell(r['best_return'], env_id)} | "
                     f"{cell(r['worst_return'], env_id)} | {theirs} | {r['seconds'] / 60:.1f} | `{r['sha256'][:16]}` |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="where the .npz files, logs and summary go")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS),
                        help=f"{', '.join(TASKS)} (their v5 envs), or any Gymnasium id with a Box action space")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--agents", default=released.AGENTS, help="folder of the agent files")
    parser.add_argument("--medium-agent", default="sac-medium", help="agent TASK-NAME.pt of medium and medium-replay")
    parser.add_argument("--expert-agent", default="td3-1m", help="agent TASK-NAME.pt of expert")
    parser.add_argument("--steps", type=int, default=1_000_000, help="transitions of each medium and expert set")
    parser.add_argument("--namespace", default="rlref", help="the Minari namespace: NAMESPACE/TASK/SET-vV")
    parser.add_argument("--version", type=int, default=0, help="the V of the ids and file names")
    parser.add_argument("--no-minari", action="store_true", help="write the .npz files only")
    parser.add_argument("--force", action="store_true",
                        help="make every set again (the medium run's checkpoint in OUTPUT/work is kept)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    for task in args.tasks:
        if task not in TASKS and "-v" not in task:
            parser.error(f"--tasks {task}: give {', '.join(TASKS)} or a Gymnasium id such as Ant-v5")
    if "medium-expert" in args.sets:  # it is made from these two
        args.sets = list(dict.fromkeys([*args.sets, "medium", "expert"]))
    if not args.no_minari:
        try:
            import minari  # noqa: F401
        except ImportError:
            fail("writing Minari datasets needs minari: pip install minari (or pass --no-minari)")
    out = os.path.abspath(os.path.expanduser(args.output_dir))
    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, "manifest.json")
    manifest = {} if args.force else read_manifest(manifest_path)
    author = f"offline_suite.py on {cpu_name()}"
    for task in args.tasks:
        env_id = TASKS.get(task, task)
        task = task_name(env_id)
        needs = {"medium": {"medium-replay", "medium"}, "expert": {"expert"}}
        agents = {kind: load_agent(args.agents, f"{task}-{getattr(args, kind + '_agent')}")
                  for kind in needs if needs[kind] & set(args.sets)}
        for agent_path, agent in agents.values():
            if agent["args"]["env_id"] != env_id:
                fail(f"{agent_path} is an agent for {agent['args']['env_id']}, not {env_id}")
        for name in [s for s in SETS if s in args.sets]:
            key, start = f"{task}-{name}-v{args.version}", time.time()
            path = os.path.join(out, f"{key}.npz")
            if name == "medium-expert":  # made from this task's two sets as they are now
                inputs = {part: manifest[f"{task}-{part}-v{args.version}"]["sha256"] for part in ("medium", "expert")}
            else:
                agent_path = agents["medium" if name == "medium-replay" else name][0]
                inputs = dict(agent=os.path.basename(agent_path), agent_sha256=sha256(agent_path),
                              steps=None if name == "medium-replay" else args.steps)
            done = manifest.get(key)
            if done and done.get("inputs") == inputs and os.path.exists(path) and sha256(path) == done["sha256"]:
                data, note = read_npz(path), "already there"
            else:
                work, log = os.path.join(out, "work", f"{task}-{name}"), os.path.join(out, "work", f"{key}.log")
                if name == "medium-replay":
                    agent_path, agent = agents["medium"]
                    work = os.path.join(out, "work", f"{task}-medium-run")
                    checkpoint_path, checkpoint = medium_run(task, agent_path, agent, work, log)
                    same = all(torch.equal(checkpoint["actor"][k], v) for k, v in agent["actor"].items())
                    note = ("the medium run's policy is the released medium agent, bit for bit" if same else
                            "warning: the medium run's policy differs from the released medium agent (another CPU "
                            "kind?); medium uses the released agent")
                    data = replay_dataset(replay_rows(checkpoint_path, checkpoint), env_id,
                                          f"{agent['script']}.py training transitions, steps 0-{agent['global_step']},"
                                          f" seed {agent['args']['seed']} (the run of agent "
                                          f"{os.path.basename(agent_path)})")
                elif name in ("medium", "expert"):
                    agent_path, agent = agents[name]
                    os.makedirs(work, exist_ok=True)
                    target = os.path.join(work, "rollouts.npz")
                    run(released.rollout_command(agent_path, agent, 10, target, args.steps), work, log)
                    data, note = read_npz(target), f"{args.steps} steps of {os.path.basename(agent_path)}"
                    os.remove(target)
                else:
                    medium = read_npz(os.path.join(out, f"{task}-medium-v{args.version}.npz"))
                    expert = read_npz(os.path.join(out, f"{task}-expert-v{args.version}.npz"))
                    data = concatenate(medium, expert, f"medium then expert: [{medium['source']}] then "
                                                       f"[{expert['source']}]")
                    note = "medium (its complete episodes) then expert"
                write_npz(path, data)
                manifest[key] = dict(task=task, set=name, file=os.path.basename(path), sha256=sha256(path),
                                     seconds=time.time() - start, inputs=inputs, note=note, minari_id=None,
                                     **statistics(data))
                write_manifest(manifest_path, manifest)  # before Minari: a failure there keeps the finished .npz
            dataset_id = f"{args.namespace}/{task}/{name}-v{args.version}"
            written = dataset_id + "@" + manifest[key]["sha256"]
            if not args.no_minari and (manifest[key].get("minari") != written or not minari_exists(dataset_id)):
                began = time.time()
                made_by = [agents[kind][1] for kind in ("medium", "expert") if kind in name]
                write_minari(dataset_id, data, author, " then ".join(
                    f"{agent['script'].split('_')[0].upper()} ({agent['script']}.py)" for agent in made_by))
                manifest[key].update(minari=written, minari_id=dataset_id, minari_seconds=time.time() - began)
                write_manifest(manifest_path, manifest)
            stats = manifest[key]
            score = "" if stats["mean_normalized"] is None else f" ({stats['mean_normalized']:.1f} normalized)"
            returns = ("no complete episode" if stats["mean_return"] is None else
                       f"return {stats['mean_return']:.1f}{score}, best {stats['best_return']:.1f}, worst "
                       f"{stats['worst_return']:.1f}")
            print(f"{task}/{name}: {stats['transitions']} transitions, {stats['episodes']} episodes, {returns}; "
                  f"{stats['seconds'] / 60:.1f} min; {note}", flush=True)
    order = {**{t: i for i, t in enumerate(TASKS)}, **{s: i for i, s in enumerate(SETS)}}
    results = sorted(manifest.values(), key=lambda r: (order.get(r["task"], 99), r["task"], order[r["set"]]))
    table = summary_table(results)  # every set made in OUTPUT so far, by this invocation or earlier ones
    atomic_text(os.path.join(out, "summary.md"), table)
    atomic_text(os.path.join(out, "summary.json"), json.dumps(dict(machine=cpu_name(), torch=torch.__version__,
                                                                    sets=results), indent=1))
    print("\n" + table)
    return results


if __name__ == "__main__":
    main()
