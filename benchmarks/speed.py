"""Training throughput of sac_continuous.py / td3_continuous.py (eager and --compile) against Stable-Baselines3's
SAC / TD3, side by side.

Every run does the same work: Hopper-v5, 256x256 networks, batch 256, Adam 3e-4 everywhere, one gradient step per
environment step; SAC: automatic temperature, target update every step; TD3: actor and target updates every 2
critic updates, target noise 0.2 clipped at 0.5, exploration noise N(0, 0.1). `--warmup` uniform-random steps, then
`--warmup-updates` untimed gradient steps (torch.compile compiles here), then `--timed-steps` timed steps, each one
environment step plus one gradient step. Implementations run one at a time in fresh processes, in alternating order,
`--repeats` times; the table shows the median updates/s and its ratio to SB3's. Our scripts flush denormal floats to
zero (torch.set_flush_denormal); `--sb3-flush-denormal` adds SB3 runs with the same setting, to show how much of the
difference that one setting accounts for.

    pip install -r benchmarks/requirements.txt
    python benchmarks/speed.py --algo sac --repeats 3 --sb3-flush-denormal
    python benchmarks/speed.py --algo td3 --repeats 3 --sb3-flush-denormal
"""

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SB3_SNIPPET = textwrap.dedent("""
    import sys, time, numpy as np, gymnasium as gym, torch
    from stable_baselines3 import SAC, TD3
    from stable_baselines3.common.noise import NormalActionNoise
    algo, (warmup, warmup_updates, timed), flush_denormal = sys.argv[1], map(int, sys.argv[2:5]), sys.argv[5] == "1"
    torch.set_flush_denormal(flush_denormal)
    env = gym.make("Hopper-v5")
    common = dict(learning_rate=3e-4, buffer_size=1_000_000, learning_starts=warmup, batch_size=256, tau=0.005,
                  gamma=0.99, train_freq=1, gradient_steps=1, policy_kwargs=dict(net_arch=[256, 256]),
                  device="cpu", seed=1, verbose=0)
    if algo == "sac":
        model = SAC("MlpPolicy", env, ent_coef="auto", target_update_interval=1, **common)
    else:
        noise = NormalActionNoise(np.zeros(env.action_space.shape), 0.1 * np.ones(env.action_space.shape))
        model = TD3("MlpPolicy", env, policy_delay=2, target_policy_noise=0.2, target_noise_clip=0.5,
                    action_noise=noise, **common)
    model.learn(warmup + warmup_updates)
    start = time.perf_counter()
    model.learn(timed, reset_num_timesteps=False)
    print("UPDATES_PER_SECOND", timed / (time.perf_counter() - start))
""")


def run_ours(script: str, warmup: int, warmup_updates: int, timed: int, compile: bool) -> float:
    """Run the real CLI; read the wall time of the TensorBoard SPS events logged at the window's two ends."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as workdir:
        begin, end = warmup + warmup_updates, warmup + warmup_updates + timed
        command = [sys.executable, os.path.join(ROOT, script), "--env-id", "Hopper-v5",
                   "--total-timesteps", str(end), "--learning-starts", str(warmup), "--log-every", str(warmup_updates),
                   "--eval-every", str(10 * end), "--eval-episodes", "1", "--seed", "1"]
        if compile:
            command.append("--compile")
        subprocess.run(command, cwd=workdir, check=True, capture_output=True)
        events = EventAccumulator(glob.glob(os.path.join(workdir, "runs", "*"))[0])
        events.Reload()
        wall = {event.step: event.wall_time for event in events.Scalars("charts/SPS")}
        return timed / (wall[end] - wall[begin])


def run_sb3(algo: str, warmup: int, warmup_updates: int, timed: int, flush_denormal: bool = False) -> float:
    result = subprocess.run([sys.executable, "-c", SB3_SNIPPET, algo, str(warmup), str(warmup_updates), str(timed),
                             str(int(flush_denormal))], check=True, capture_output=True, text=True)
    return float(result.stdout.split("UPDATES_PER_SECOND")[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=["sac", "td3"], default="sac")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1000, help="uniform-random steps before updates")
    parser.add_argument("--warmup-updates", type=int, default=1000, help="untimed steps with updates")
    parser.add_argument("--timed-steps", type=int, default=3000, help="timed steps (env step + update)")
    parser.add_argument("--no-compile", action="store_true", help="skip the --compile runs")
    parser.add_argument("--no-sb3", action="store_true", help="time our script only (e.g. where SB3 is not installed)")
    parser.add_argument("--sb3-flush-denormal", action="store_true",
                        help="also run SB3 with torch.set_flush_denormal(True), which our scripts set")
    args = parser.parse_args()
    if min(args.repeats, args.warmup_updates, args.timed_steps) < 1 or args.warmup < 0:
        parser.error("--repeats, --warmup-updates and --timed-steps must be at least 1, --warmup at least 0")
    if args.timed_steps % args.warmup_updates:  # the speed is read off charts/SPS, logged every --warmup-updates steps
        parser.error(f"--timed-steps must be a multiple of --warmup-updates (got {args.timed_steps} and "
                     f"{args.warmup_updates})")

    script, sb3_name = f"{args.algo}_continuous.py", f"Stable-Baselines3 {args.algo.upper()}"
    timing = (args.warmup, args.warmup_updates, args.timed_steps)
    runners = {} if args.no_sb3 else {sb3_name: lambda: run_sb3(args.algo, *timing)}
    runners[script] = lambda: run_ours(script, *timing, compile=False)
    if args.sb3_flush_denormal:
        runners[f"{sb3_name}, flush denormals"] = lambda: run_sb3(args.algo, *timing, flush_denormal=True)
    if not args.no_compile:
        runners[f"{script} --compile"] = lambda: run_ours(script, *timing, compile=True)
    results = {name: [] for name in runners}
    for repeat in range(args.repeats):
        order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
        for name in order:
            results[name].append(runners[name]())
            print(f"repeat {repeat + 1}: {name}: {results[name][-1]:.1f} updates/s", flush=True)

    import torch

    sb3 = "" if args.no_sb3 else f"stable-baselines3 {__import__('stable_baselines3').__version__}, "
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"  # where our scripts trained
    baseline = None if args.no_sb3 else statistics.median(results[sb3_name])
    print(f"\nHopper-v5, torch {torch.__version__}, {torch.get_num_threads()} threads, {sb3}{os.cpu_count()} CPUs, "
          f"ours on {device}, median of {args.repeats}")
    print("| implementation | updates/s (median) | runs | vs SB3 |\n|---|---|---|---|")
    for name, values in results.items():
        runs, median = ", ".join(f"{value:.0f}" for value in values), statistics.median(values)
        print(f"| {name} | {median:.1f} | {runs} | {'n/a' if baseline is None else f'{median / baseline:.2f}x'} |")


if __name__ == "__main__":
    main()
