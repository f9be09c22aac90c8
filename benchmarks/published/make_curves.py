"""Rebuild the curve files of this folder from the two sources' git repositories (see README.md here):

    python benchmarks/published/make_curves.py --tianshou GIT_DIR_OF_thu-ml/tianshou --td3 GIT_DIR_OF_sfujim/TD3

Each source file is read with `git show COMMIT:PATH` (the .npy arrays through numpy), its x-axis converted to
environment steps, and written here as text: a few `# key: value` lines, then CSV with the columns env_steps,
source_x, seed_0 ... seed_9 (and, for Tianshou, its own mean and std columns, kept to check the per-seed values).
Only text is written; nothing of the sources but these numbers."""

import argparse
import csv
import io
import os
import re
import subprocess

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("HalfCheetah", "Hopper", "Walker2d")

TIANSHOU_COMMIT = "39acf2094d96268d92ebb54dcbfc3de76d702567"
TIANSHOU_WARMUP = {"sac": 10_000, "td3": 25_000}  # --start-timesteps of examples/mujoco/mujoco_{sac,td3}.py
TIANSHOU_PROTOCOL = {
    "sac": "deterministic policy (the mean action; SACPolicy deterministic_eval=True), 10 test episodes on 10 test "
           "envs seeded with the run's seed, undiscounted return averaged; an evaluation every 5000 environment steps",
    "td3": "policy without exploration noise, 10 test episodes on 10 test envs seeded with the run's seed, "
           "undiscounted return averaged; an evaluation every 5000 environment steps"}
TIANSHOU_SETTINGS = {
    "sac": "mujoco_sac.py defaults: 10k uniform-random warm-up steps, then 1 update per environment step, batch 256, "
           "256-256 networks, Adam lr 1e-3 (actor and critics), fixed alpha 0.2 (no --auto-alpha), tau 0.005, "
           "gamma 0.99, 1 training env",
    "td3": "mujoco_td3.py defaults: 25k uniform-random warm-up steps, then 1 update per environment step, batch 256, "
           "256-256 networks, Adam lr 3e-4, policy delay 2, exploration noise 0.1, target noise 0.2 clipped at 0.5, "
           "tau 0.005, gamma 0.99, 1 training env"}

TD3_COMMIT = "bc98e6260e4e35e1a2afc1c78b6925251dd0a1e9"
TD3_FOLDER = {"HalfCheetah": "HalfCheetah", "Hopper": "Hopper", "Walker2d": "Walker"}
TD3_START_STEPS = {"HalfCheetah": 10_000, "Hopper": 1_000, "Walker2d": 1_000}  # run_experiments.sh at TD3_COMMIT


def git_show(git_dir: str, commit: str, path: str) -> bytes:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"], check=True,
                          capture_output=True).stdout


def write_curve(name: str, meta: dict, columns: list, rows: list):
    with open(os.path.join(HERE, name), "w", newline="") as file:
        for key, value in meta.items():
            file.write(f"# {key}: {value}\n")
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def tianshou(git_dir: str):
    for algorithm in ("sac", "td3"):
        for task in TASKS:
            path = f"examples/mujoco/benchmark/{task}-v3/{algorithm}/test_rew_10seeds.csv"
            table = list(csv.reader(io.StringIO(git_show(git_dir, TIANSHOU_COMMIT, path).decode())))
            header, body = table[0], table[1:]
            seeds = [int(re.match(r"rew:seed_(\d+)_", column)[1]) for column in header[3:]]
            assert header[:3] == ["env_step", "rew", "rew:shaded"] and sorted(seeds) == list(range(10)), header
            order = [3 + seeds.index(seed) for seed in range(10)]
            rows = [[int(row[0]) + TIANSHOU_WARMUP[algorithm], int(row[0]), *(row[i] for i in order), row[1], row[2]]
                    for row in body]
            warmup = TIANSHOU_WARMUP[algorithm]
            write_curve(f"tianshou_{algorithm}_{task}.csv", {
                "source": "Tianshou benchmark",
                "algorithm": algorithm,
                "task": task,
                "env_version": "v3",
                "repository": "thu-ml/tianshou",
                "commit": TIANSHOU_COMMIT,
                "file": path,
                "seeds": 10,
                "x_name": "x =",
                "x_axis": f"source_x is Tianshou's env_step, counted by tianshou/trainer/offpolicy.py from 0 after the "
                          f"{warmup} random warm-up steps that examples/mujoco/mujoco_{algorithm}.py collects before "
                          f"the trainer starts; env_steps = source_x + {warmup}",
                "protocol": TIANSHOU_PROTOCOL[algorithm],
                "settings": TIANSHOU_SETTINGS[algorithm],
                "columns": "seed_0..seed_9 as in the source (rounded to 4 decimals there); source_mean and "
                           "source_std are the source's rew and rew:shaded columns (mean and population std)",
            }, ["env_steps", "source_x", *(f"seed_{seed}" for seed in range(10)), "source_mean", "source_std"], rows)


def td3_authors(git_dir: str):
    for task in TASKS:
        curves = []
        for seed in range(10):
            path = f"learning_curves/{TD3_FOLDER[task]}/TD3_{task}-v1_{seed}.npy"
            curves.append(np.load(io.BytesIO(git_show(git_dir, TD3_COMMIT, path)), allow_pickle=False))
        curves = np.stack(curves)  # (10 seeds, 201 evaluations)
        assert curves.shape == (10, 201), curves.shape
        rows = [[5000 * index, index, *(repr(float(value)) for value in curves[:, index])]
                for index in range(curves.shape[1])]
        start = TD3_START_STEPS[task]
        write_curve(f"td3-authors_td3_{task}.csv", {
            "source": "TD3 authors' learning curves",
            "algorithm": "td3",
            "task": task,
            "env_version": "v1",
            "repository": "sfujim/TD3",
            "commit": TD3_COMMIT,
            "file": f"learning_curves/{TD3_FOLDER[task]}/TD3_{task}-v1_{{0..9}}.npy",
            "seeds": 10,
            "x_name": "index",
            "x_axis": "source_x is the index in the (201,) array: index 0 is the untrained policy, index k >= 1 the "
                      "evaluation main.py makes at the first episode end at or after 5000 k steps "
                      "(timesteps_since_eval is reduced modulo 5000); env_steps = 5000 source_x, exact on "
                      "HalfCheetah (1000-step episodes), up to 999 steps early on Hopper and Walker2d, whose "
                      "episodes can end sooner",
            "protocol": "policy without exploration noise, 10 episodes on the training env itself (not separately "
                        "seeded), average undiscounted return; evaluated at an episode end, after that episode's "
                        "training",
            "settings": f"run_experiments.sh and main.py: --start_timesteps {start} (uniform-random actions for the "
                        f"first {start} steps), then exploration noise 0.1; at every episode end TD3.train runs as "
                        "many updates as the episode had steps (the random phase included), so about one update per "
                        "environment step; batch 100, 400-300 networks, Adam at lr 1e-3 (torch default), policy delay "
                        "2, target noise 0.2 clipped at 0.5, tau 0.005, gamma 0.99",
            "columns": "seed_0..seed_9 are the arrays' float64 values",
        }, ["env_steps", "source_x", *(f"seed_{seed}" for seed in range(10))], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tianshou", required=True, help="git directory of thu-ml/tianshou")
    parser.add_argument("--td3", required=True, help="git directory of sfujim/TD3")
    args = parser.parse_args()
    tianshou(args.tianshou)
    td3_authors(args.td3)


if __name__ == "__main__":
    main()
