"""d3rlpy's Decision Transformer as a side-by-side peer of decision_transformer.py: d3rlpy's own implementation, given
our script's settings (the paper's gym configuration) and evaluated with our protocol, on the same dataset file.

    pip install -r benchmarks/requirements-d3rlpy.txt     (in an environment of its own: d3rlpy pins gymnasium 1.0.0)
    D3RLPY_PYTHON=ENV/bin/python python benchmarks/reproduce.py --scripts decision_transformer.py d3rlpy_dt \
        --datasets ~/offline_v5/hopper-medium-v0.npz --seeds 1 --total-timesteps 100000 --output-dir OUT \
        -- --eval-episodes 10                 (the harness runs this file, with $D3RLPY_PYTHON, for `d3rlpy_dt`)
    ENV/bin/python benchmarks/d3rlpy_peer.py --dataset data.npz --total-steps 100000 --eval-episodes 10

Settings: the defaults of every flag are read from the `Args` of decision_transformer.py, and given to d3rlpy as its
reproduction script (reproductions/offline/decision_transformer.py) does: context_size K, batch size, learning rate,
GPTAdamWFactory(weight_decay), warm-up steps, one Linear(obs, embed_dim) state encoder
(VectorEncoderFactory([embed_dim], exclude_last_activation=True)), heads, layers, the one dropout for attention,
residual and embedding, ReLU, a learned timestep embedding (SIMPLE), max_timestep, gradient clipping, states
standardised with the data's mean and std, rewards multiplied by 1 / reward_scale. What stays different (d3rlpy's code,
not a setting):
  * weight decay: d3rlpy's GPTAdamWFactory decays the Linear weights only; the official code, and ours, decay every
    parameter (biases, LayerNorms and embeddings too);
  * windows: d3rlpy draws a row uniformly and takes the K steps that end there (padding on the left, timesteps from 1);
    ours draws a row uniformly and takes the K steps that start there (padding on the right, timesteps from 0);
  * state std: d3rlpy's StandardObservationScaler adds 1e-3 to the std, ours 1e-6 (the official code: 1e-6);
  * the transformer: d3rlpy's own GPT-2 (pre-LayerNorm blocks with a 4x ReLU MLP, as ours and the official
    trajectory_gpt2.py) has LayerNorm eps 0.003 (ours and GPT-2's: 1e-5), masks its left pads in attention (ours need
    no mask: right pads sit after every real token), and initialises its timestep embedding N(0, 0.02) with the
    transformer (ours and the official code: PyTorch's N(0, 1) default; the other embeddings and the head keep
    PyTorch's defaults in all three);
  * evaluation steps one episode at a time through d3rlpy's StatefulTransformerWrapper (ours: all at once in a vector
    env); the episodes, their seeds and the targets are the same.
Evaluation (ours exactly): every --eval-every gradient steps and at the end, --eval-episodes episodes per target
return (--target-returns, else the official ones for the task), episode i reset with seed + 10000 + i, returns summed;
logged to TensorBoard in runs/<run name>/ as eval/return_target_T and eval/normalized_score_target_T, which
reproduce.py reads. --save-model writes a checkpoint at every evaluation (and every --checkpoint-every steps):
runs/<run name>/d3rlpy_dt.pt (the step, the settings, the task and the random generators) naming d3rlpy's own model
file of that step (networks, optimiser and warm-up state, fitted scalers). `--resume runs/<run name>/d3rlpy_dt.pt`
continues the run from there, in the same folder, with the same generators (the harness resumes an interrupted run
so); --eval-checkpoint evaluates a checkpoint's model and prints one line per target as decision_transformer.py's
evaluation-only mode does. This file imports decision_transformer.py for its defaults, dataset reader and
references; it does not import this file.
"""

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["context_len", "embed_dim", "n_layers", "n_heads", "dropout", "max_ep_len", "batch_size", "learning_rate",
         "weight_decay", "warmup_steps", "grad_clip", "total_steps", "reward_scale", "eval_every", "eval_episodes",
         "log_every"]


def fail(message: str):
    raise SystemExit(f"d3rlpy_peer.py: error: {message}")


def our_script():
    sys.path.insert(0, ROOT)
    import decision_transformer

    return decision_transformer


def parse_args(argv=None) -> argparse.Namespace:
    defaults = {field.name: field.default for field in dataclasses.fields(our_script().Args)}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="an .npz, a D4RL .hdf5 or a Minari id, as decision_transformer.py reads")
    parser.add_argument("--env-id", default=None, help="default: the dataset's")
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--target-returns", type=float, nargs="+", default=None)
    for name in FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(defaults[name]), default=defaults[name])
    parser.add_argument("--save-model", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="with --save-model, also checkpoint every N steps (default: at evaluations only)")
    parser.add_argument("--resume", default=None, help="continue the run of this d3rlpy_dt.pt checkpoint")
    parser.add_argument("--eval-checkpoint", default=None, help="evaluate the model of this d3rlpy_dt.pt and stop")
    parser.add_argument("--no-cuda", action="store_true", help="accepted: this peer runs on the CPU")
    args = parser.parse_args(argv)
    if args.eval_checkpoint is None and args.dataset is None:
        fail("pass --dataset (or --eval-checkpoint)")
    if args.resume and args.eval_checkpoint:
        fail("give either --resume or --eval-checkpoint, not both")
    for name in FLAGS:
        if getattr(args, name) <= 0 and name not in ("weight_decay", "dropout"):
            fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    return args


def make_algo(args, d3rlpy):
    """d3rlpy's DecisionTransformer with our settings, as d3rlpy's reproduction script builds it."""
    return d3rlpy.algos.DecisionTransformerConfig(
        batch_size=args.batch_size, learning_rate=args.learning_rate,
        optim_factory=d3rlpy.optimizers.GPTAdamWFactory(weight_decay=args.weight_decay,
                                                        clip_grad_norm=args.grad_clip,
                                                        lr_scheduler_factory=d3rlpy.optimizers.WarmupSchedulerFactory(
                                                            warmup_steps=args.warmup_steps)),
        encoder_factory=d3rlpy.models.VectorEncoderFactory([args.embed_dim], exclude_last_activation=True),
        observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
        reward_scaler=d3rlpy.preprocessing.MultiplyRewardScaler(1.0 / args.reward_scale),
        context_size=args.context_len, max_timestep=args.max_ep_len, num_heads=args.n_heads, num_layers=args.n_layers,
        attn_dropout=args.dropout, resid_dropout=args.dropout, embed_dropout=args.dropout, activation_type="relu",
    ).create(device=False)


def evaluate(algo, dt, task: dict, episodes: int, seed: int) -> np.ndarray:
    """(targets, episodes) returns; episode i of every target resets with seed + 10000 + i (ours)."""
    returns = np.zeros((len(task["target_returns"]), episodes))
    for t, target in enumerate(task["target_returns"]):
        actor = algo.as_stateful_wrapper(target_return=target)
        for i in range(episodes):
            env = dt.make_env(task["env_id"], seed, task["env_kwargs"])
            low, high = env.action_space.low, env.action_space.high
            obs, _ = env.reset(seed=seed + 10_000 + i)
            reward, done = 0.0, False
            while not done:
                action = actor.predict(obs.astype(np.float32), reward)
                obs, reward, terminated, truncated, _ = env.step(np.clip(action, low, high))
                returns[t, i] += reward
                done = terminated or truncated
            actor.reset()
            env.close()
    return returns


def random_state() -> dict:
    """The generators d3rlpy's training draws from: numpy's global one (windows), torch's (dropout), python's."""
    import random

    import torch

    kind, keys, position, has_gauss, cached = np.random.get_state()
    return dict(numpy=[torch.as_tensor(keys.astype(np.int64)), position, has_gauss, cached],
                torch=torch.get_rng_state(), python=random.getstate())


def set_random_state(state: dict):
    import random

    import torch

    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(algo, run_name: str, step: int, task: dict, args):
    """runs/<run>/d3rlpy_dt.pt (step, settings, task, random generators; what --resume and --eval-checkpoint read)
    naming d3rlpy's own model file of that step (d3rlpy_dt_<step>.d3: networks, optimiser and warm-up state, fitted
    scalers); each is written to a temporary file and renamed, the model first, so a kill leaves a complete pair."""
    import torch

    folder = f"runs/{run_name}"
    model = f"d3rlpy_dt_{step}.d3"
    algo.save(f"{folder}/{model}.tmp")
    os.replace(f"{folder}/{model}.tmp", f"{folder}/{model}")
    refs = None if task["refs"] is None else [float(value) for value in task["refs"]]
    torch.save(dict(script="d3rlpy_dt", global_step=step, run_name=run_name, model=model, args=vars(args),
                    task={**{key: task[key] for key in ("env_id", "env_kwargs", "target_returns", "ref_source")},
                          "refs": refs}, random=random_state()), f"{folder}/d3rlpy_dt.pt.tmp")
    os.replace(f"{folder}/d3rlpy_dt.pt.tmp", f"{folder}/d3rlpy_dt.pt")
    for name in os.listdir(folder):
        if name.startswith("d3rlpy_dt_") and name.endswith(".d3") and name != model:
            os.remove(f"{folder}/{name}")


def main(argv=None):
    args = parse_args(argv)
    try:
        import d3rlpy
        import torch
    except ImportError:
        fail("needs d3rlpy: pip install -r benchmarks/requirements-d3rlpy.txt (in its own environment)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    dt = our_script()
    checkpoint = args.eval_checkpoint or args.resume
    if checkpoint:
        try:
            saved = torch.load(checkpoint, weights_only=True)
            algo = d3rlpy.load_learnable(os.path.join(os.path.dirname(checkpoint), saved["model"]))
        except (OSError, KeyError, RuntimeError) as error:
            fail(f"cannot read checkpoint '{checkpoint}' ({type(error).__name__}: {error}); pass a d3rlpy_dt.pt")
    if args.eval_checkpoint:
        task = saved["task"]
        for target, returns in zip(task["target_returns"],
                                   evaluate(algo, dt, task, args.eval_episodes, saved["args"]["seed"])):
            print(f"evaluation of {checkpoint} (step {saved['global_step']}) on {task['env_id']}, target {target:g}: "
                  f"{dt.describe_returns(returns, task['refs'], task['ref_source'])}")
        return
    d3rlpy.seed(args.seed)
    data = dt.load_dataset(args.dataset)
    task = dt.dataset_task(data, dt.Args(dataset=args.dataset, env_id=args.env_id, target_returns=args.target_returns))
    timeouts = data["timeouts"].copy()
    timeouts[-1] |= not data["terminals"][-1]  # d3rlpy needs the last row to end an episode
    as_float = lambda array: np.asarray(array, np.float32)  # noqa: E731
    dataset = d3rlpy.dataset.MDPDataset(as_float(data["observations"]), as_float(data["actions"]),
                                        as_float(data["rewards"])[:, None], as_float(data["terminals"]),
                                        as_float(timeouts))
    start = saved["global_step"] if args.resume else 0
    if args.resume:
        changed = [key for key in FLAGS + ["seed", "dataset", "env_id", "target_returns"]
                   if key not in ("total_steps", "log_every") and getattr(args, key) != saved["args"][key]]
        if changed:
            fail(f"--resume: {', '.join(changed)} differ from the checkpoint's run; a resumed run keeps its settings")
        if args.total_steps <= start:
            fail(f"--total-steps ({args.total_steps}) must exceed the checkpoint's step ({start}) to resume")
        set_random_state(saved["random"])
    else:
        algo = make_algo(args, d3rlpy)
    run_name = saved["run_name"] if args.resume else f"{task['env_id']}__d3rlpy_dt__{args.seed}__{int(time.time())}"
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(f"runs/{run_name}", purge_step=start + 1 if args.resume else None)
    print(f"run {run_name}: {args.dataset} ({len(data['rewards'])} steps, {len(task['episode_returns'])} episodes) "
          f"-> {task['env_id']}, d3rlpy {d3rlpy.__version__}, targets {task['target_returns']}"
          + (f", resumed at step {start}" if args.resume else ""), flush=True)
    clock = time.time()

    def run_evaluation(step):
        for target, returns in zip(task["target_returns"], evaluate(algo, dt, task, args.eval_episodes, args.seed)):
            writer.add_scalar(f"eval/return_target_{target:g}", returns.mean(), step)
            if task["refs"] is not None:
                writer.add_scalar(f"eval/normalized_score_target_{target:g}",
                                  dt.normalized_score(returns.mean(), task["refs"]), step)
            print(f"eval at step {step} (target {target:g}): "
                  f"{dt.describe_returns(returns, task['refs'], task['ref_source'])}", flush=True)
        writer.flush()

    def callback(algo_, epoch, done):  # d3rlpy counts the steps of this call of fit from 1
        step = start + done
        if step % args.log_every == 0:
            print(f"step {step}/{args.total_steps} | {(step - start) / (time.time() - clock):.2f} steps/s (with "
                  f"evaluations)", flush=True)
        if step % args.eval_every == 0 or step == args.total_steps:
            run_evaluation(step)
            if args.save_model:  # at every evaluation, as decision_transformer.py
                save_checkpoint(algo, run_name, step, task, args)
        elif args.save_model and args.checkpoint_every and step % args.checkpoint_every == 0:
            save_checkpoint(algo, run_name, step, task, args)

    algo.fit(dataset, n_steps=args.total_steps - start, n_steps_per_epoch=args.total_steps - start,
             show_progress=False, logger_adapter=d3rlpy.logging.NoopAdapterFactory(), callback=callback,
             save_interval=10**9)
    if args.save_model:
        print(f"saved checkpoint to runs/{run_name}/d3rlpy_dt.pt")
    writer.close()


if __name__ == "__main__":
    main()
