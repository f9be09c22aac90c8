"""Stable-Baselines3's SAC and TD3 as side-by-side peers of sac_continuous.py and td3_continuous.py: SB3's own
implementation, given our scripts' default hyperparameters and evaluated with our protocol, so that a difference in
returns is a difference between the implementations, not between their settings or their evaluations.

    python benchmarks/sb3_peer.py --algo sac --env-id HalfCheetah-v5 --seed 1 --total-timesteps 100000
    python benchmarks/reproduce.py --scripts sac_continuous.py sb3_sac --env-ids HalfCheetah-v5 --seeds 1 2 3 \
        --total-timesteps 100000 --output-dir OUT        (the harness runs this file for `sb3_sac` and `sb3_td3`)

Hyperparameters: the defaults of every flag are read from the `Args` of sac_continuous.py (--algo sac) or
td3_continuous.py (--algo td3), so they follow our scripts; the same flags override them. Settings of ours that SB3
cannot express stop the run with a one-line error (SAC: one learning rate for policy, critics and temperature,
policy and target updates every step, log-std clamped to [-20, 2]; TD3: one learning rate for actor and critics).
What stays different by design (SB3's code, not a setting):
  * SAC's temperature loss is -log(alpha) (log pi + H_target) in SB3, -alpha (log pi + H_target) in ours (the paper's
    Eq. (18)); the gradients differ by the factor alpha, which Adam mostly normalises away. SB3 takes the temperature
    step first in each update, ours last (the critics' target and the policy loss use the alpha from before the step
    in both).
  * TD3: SB3 adds the exploration noise to the uniform-random warm-up actions too (then clips to [-1, 1]); ours
    acts uniformly at random until --learning-starts.
  * Separate mean and log-std layers in SB3's SAC policy (ours: one layer with both outputs: the same function);
    two critic MLPs (ours: stacked into one batched matmul); SB3 stores observations in the env's dtype (float64 on
    MuJoCo) and rounds them to float32 when it samples, ours when it stores (the same values reach the networks).
Evaluation (ours exactly): every --eval-every environment steps, after that step's gradient update, and at the end,
--eval-episodes episodes of the deterministic policy (SAC: tanh of the mean; TD3: no noise) on a separate env whose
episode i resets with seed + 10000 + i, returns summed over each episode; logged to TensorBoard in runs/<run name>/
as eval/episodic_return and eval/normalized_score (D4RL references, as ours), which reproduce.py reads.
--save-model writes SB3's model (no replay buffer) to runs/<run name>/sb3_<algo>.zip at the end; there is no resume.
--checkpoint-every is accepted (the harness may pass it to every script) and ignored.
This file imports our scripts for their defaults and reference scores; none of them imports it.
"""

import argparse
import dataclasses
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"sac": "sac_continuous", "td3": "td3_continuous"}
# Our flags this peer takes, per algorithm (their defaults come from the script's Args).
HYPERPARAMETERS = {
    "sac": ["buffer_size", "gamma", "tau", "batch_size", "learning_starts", "hidden_dim", "policy_lr", "q_lr",
            "alpha_lr", "autotune", "alpha", "initial_alpha"],
    "td3": ["buffer_size", "gamma", "tau", "batch_size", "learning_starts", "hidden_dims", "policy_lr", "q_lr",
            "policy_frequency", "exploration_noise", "policy_noise", "noise_clip"],
}
COMMON = ["total_timesteps", "eval_every", "eval_episodes", "log_every"]
SB3_LOG_STD = (-20.0, 2.0)  # stable_baselines3.sac.policies LOG_STD_MIN, LOG_STD_MAX


def fail(message: str):
    raise SystemExit(f"sb3_peer.py: error: {message}")


def our_script(algo: str):
    sys.path.insert(0, ROOT)
    import importlib

    return importlib.import_module(SCRIPTS[algo])


def our_defaults(algo: str) -> dict:
    """name -> default of the Args fields of our script for `algo`."""
    return {field.name: field.default for field in dataclasses.fields(our_script(algo).Args)
            if field.default is not dataclasses.MISSING}


def parse_args(argv=None) -> argparse.Namespace:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--algo", choices=sorted(SCRIPTS), required=True)
    known, _ = first.parse_known_args(argv)
    defaults = our_defaults(known.algo)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", choices=sorted(SCRIPTS), required=True, help="SB3's SAC or TD3")
    parser.add_argument("--env-id", default=defaults["env_id"])
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=defaults["cuda"],
                        help="train on CUDA when it is available")
    parser.add_argument("--save-model", action="store_true", help="write runs/<run name>/sb3_<algo>.zip at the end")
    parser.add_argument("--checkpoint-every", type=int, help="accepted and ignored (no checkpoints here)")
    for name in COMMON + HYPERPARAMETERS[known.algo]:
        default, flag = defaults[name], "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=type(default[0]), nargs=len(default), default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"ours: {default}")
    return parser.parse_args(argv)


def check_expressible(args, defaults: dict):
    """Stop with one line where our settings have no SB3 counterpart."""
    if args.algo == "sac":
        if not args.policy_lr == args.q_lr == args.alpha_lr:
            fail(f"SB3's SAC has one learning rate; got --policy-lr {args.policy_lr}, --q-lr {args.q_lr}, "
                 f"--alpha-lr {args.alpha_lr}")
        for name, sb3 in [("policy_frequency", 1), ("target_network_frequency", 1)]:
            if defaults[name] != sb3:
                fail(f"sac_continuous.py's default {name} = {defaults[name]}; SB3's SAC updates every step ({sb3})")
        if (defaults["log_std_min"], defaults["log_std_max"]) != SB3_LOG_STD:
            fail(f"sac_continuous.py clamps log std to [{defaults['log_std_min']}, {defaults['log_std_max']}]; "
                 f"SB3 to {list(SB3_LOG_STD)}")
    elif args.policy_lr != args.q_lr:
        fail(f"SB3's TD3 has one learning rate; got --policy-lr {args.policy_lr}, --q-lr {args.q_lr}")
    for name in ["total_timesteps", "eval_every", "eval_episodes", "log_every", "batch_size", "buffer_size"]:
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")


def build_model(args, env):
    """SB3's SAC or TD3 with our settings: one environment step, then one gradient step, after --learning-starts
    uniform-random steps."""
    from stable_baselines3 import SAC, TD3
    from stable_baselines3.common.noise import NormalActionNoise

    device = "cuda" if args.cuda and torch.cuda.is_available() else "cpu"
    common = dict(learning_rate=args.policy_lr, buffer_size=min(args.buffer_size, args.total_timesteps),
                  learning_starts=args.learning_starts, batch_size=args.batch_size, tau=args.tau, gamma=args.gamma,
                  train_freq=1, gradient_steps=1, seed=args.seed, device=device, verbose=0)
    if args.algo == "sac":
        return SAC("MlpPolicy", env, ent_coef=f"auto_{args.initial_alpha}" if args.autotune else args.alpha,
                   target_entropy="auto", target_update_interval=1,
                   policy_kwargs=dict(net_arch=[args.hidden_dim, args.hidden_dim]), **common)
    act_dim = env.action_space.shape[0]
    # Exploration noise in SB3's [-1, 1] action units, as ours: sigma per dimension of the half range.
    noise = NormalActionNoise(np.zeros(act_dim), args.exploration_noise * np.ones(act_dim)) \
        if args.exploration_noise > 0 else None
    return TD3("MlpPolicy", env, action_noise=noise, policy_delay=args.policy_frequency,
               target_policy_noise=args.policy_noise, target_noise_clip=args.noise_clip,
               policy_kwargs=dict(net_arch=list(args.hidden_dims)), **common)


def evaluate(model, env: gym.Env, episodes: int, seed: int) -> np.ndarray:
    """Returns of `episodes` episodes of the deterministic policy; episode i resets with seed + i (as our scripts)."""
    returns = np.zeros(episodes)
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done = False
        while not done:
            action, _ = model.predict(obs, deterministic=True)  # in the env's bounds: low + (a + 1) (high - low) / 2
            obs, reward, terminated, truncated, _ = env.step(action)
            returns[episode] += reward
            done = terminated or truncated
    return returns


def make_callback(args, eval_env, writer, ours):
    from stable_baselines3.common.callbacks import BaseCallback

    class Evaluations(BaseCallback):
        """Evaluations at every --eval-every steps (before the next collection, so after that step's update), the
        episodes' returns and a progress line every --log-every steps."""

        def _on_training_start(self):
            self.clock, self.last_step, self.evaluation_seconds = time.perf_counter(), 0, 0.0

        def _on_rollout_start(self):
            step = self.num_timesteps
            if step and step % args.eval_every == 0 and step < args.total_timesteps:
                start = time.perf_counter()
                run_evaluation(args, self.model, eval_env, writer, ours, step)
                self.evaluation_seconds += time.perf_counter() - start

        def _on_step(self) -> bool:
            step = self.num_timesteps
            for info in self.locals.get("infos", []):
                if "episode" in info:  # SB3's Monitor wrapper
                    writer.add_scalar("charts/episodic_return", info["episode"]["r"], step)
                    writer.add_scalar("charts/episodic_length", info["episode"]["l"], step)
            if step % args.log_every == 0 or step == args.total_timesteps:
                now = time.perf_counter()
                sps = (step - self.last_step) / max(now - self.clock - self.evaluation_seconds, 1e-9)
                writer.add_scalar("charts/SPS", sps, step)
                print(f"step {step}/{args.total_timesteps} | {sps:.0f} SPS", flush=True)
                self.clock, self.last_step, self.evaluation_seconds = now, step, 0.0
            return True

    return Evaluations()


def run_evaluation(args, model, eval_env, writer, ours, step: int) -> np.ndarray:
    returns = evaluate(model, eval_env, args.eval_episodes, args.seed + 10_000)
    writer.add_scalar("eval/episodic_return", returns.mean(), step)
    refs = ours.reference_scores(args.env_id)
    score = ours.normalized_score(returns.mean(), refs)
    if score is not None:
        writer.add_scalar("eval/normalized_score", score, step)
    print(f"eval at step {step}: {ours.describe_returns(returns, refs)}", flush=True)
    return returns


def make_env(env_id: str, seed: int) -> gym.Env:
    try:
        env = gym.make(env_id)
    except Exception as error:
        fail(f"cannot make environment '{env_id}' ({type(error).__name__}: {str(error).partition(chr(10))[0]})")
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"{env_id} has actions {env.action_space}; SAC and TD3 need a continuous Box action space")
    env.action_space.seed(seed)
    return env


def main(argv=None) -> np.ndarray:
    args = parse_args(argv)
    ours = our_script(args.algo)
    check_expressible(args, our_defaults(args.algo))
    from torch.utils.tensorboard import SummaryWriter

    run_name = f"{args.env_id}__sb3_{args.algo}__{args.seed}__{int(time.time())}"
    env, eval_env = make_env(args.env_id, args.seed), make_env(args.env_id, args.seed + 10_000)
    model = build_model(args, env)
    writer = SummaryWriter(f"runs/{run_name}")
    table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    print(f"run {run_name}: SB3 {args.algo.upper()} on {args.env_id}, device {model.device}, "
          f"{args.total_timesteps} steps", flush=True)
    model.learn(total_timesteps=args.total_timesteps, callback=make_callback(args, eval_env, writer, ours))
    returns = run_evaluation(args, model, eval_env, writer, ours, args.total_timesteps)
    print(f"final evaluation: {ours.describe_returns(returns, ours.reference_scores(args.env_id))}")
    if args.save_model:
        model.save(f"runs/{run_name}/sb3_{args.algo}.zip")
        print(f"saved model to runs/{run_name}/sb3_{args.algo}.zip")
    writer.close()
    env.close()
    eval_env.close()
    return returns


if __name__ == "__main__":
    main()
