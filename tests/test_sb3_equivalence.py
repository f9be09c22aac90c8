"""Our SAC and TD3 updates against Stable-Baselines3's, update for update.

Each test runs our script's real training loop (`main`) and, at every call of its `update`, one gradient step of
SB3's `SAC.train` / `TD3.train` on an SB3 model that started from the same weights, fed the same minibatch and the
same noise. After every step the two must hold the same critics, actor, target networks and losses, and the
gradients each optimiser stepped with must agree. SB3 is an independent implementation: the agreement shows that our
update is the update users already trust, and a dropped term or a changed order of steps breaks it.

Tolerance: our scripts train in float32; the SB3 model computes in float64 from the same float32 weights and
batches, as an exact reference. (In float32, SB3's log(1 - tanh(u)^2), computed from the squashed action, loses
most of its digits once actions saturate, which SAC's policy does within a few steps at alpha = 1; ours uses a
stable form.) So the two differ by our float32 rounding only: each tensor must agree within 1e-4 of its own largest
entry (and 1e-4 relative). That leaves room for rounding and for nothing else: a dropped entropy term or an actor
step at the wrong time changes values by far more from the step it happens on."""

import copy

import gymnasium as gym
import pytest
import torch

import sac_continuous as sac
import td3_continuous as td3

sb3 = pytest.importorskip("stable_baselines3")
from stable_baselines3.common.logger import configure  # noqa: E402
from stable_baselines3.common.type_aliases import ReplayBufferSamples  # noqa: E402

TOLERANCE = 1e-4
STEPS = 12  # gradient steps compared: covers TD3's delayed actor (every 2nd) several times


def stacked_to_sb3(qf) -> dict:
    """Our stacked twin critic (weights (2, in, out)) as SB3's ContinuousCritic state dict (qf0, qf1 Sequentials)."""
    out = {}
    for i in range(2):
        for layer, (w, b) in enumerate([(qf.w1, qf.b1), (qf.w2, qf.b2), (qf.w3, qf.b3)]):
            out[f"qf{i}.{2 * layer}.weight"], out[f"qf{i}.{2 * layer}.bias"] = w[i].T, b[i, 0]
    return out


def sac_actor_to_sb3(actor: sac.Actor) -> dict:
    act_dim = actor.head.out_features // 2  # our head holds mean and log std side by side
    return {"latent_pi.0.weight": actor.fc1.weight, "latent_pi.0.bias": actor.fc1.bias,
            "latent_pi.2.weight": actor.fc2.weight, "latent_pi.2.bias": actor.fc2.bias,
            "mu.weight": actor.head.weight[:act_dim], "mu.bias": actor.head.bias[:act_dim],
            "log_std.weight": actor.head.weight[act_dim:], "log_std.bias": actor.head.bias[act_dim:]}


def td3_actor_to_sb3(actor: td3.Actor) -> dict:
    return {f"mu.{2 * i}.{kind}": getattr(getattr(actor, f"fc{i + 1}"), kind) for i in range(3)
            for kind in ("weight", "bias")}


def assert_same_step_grads(ours: "StepGrads", theirs: "StepGrads", module, sb3_module, to_sb3, where: str):
    """The last gradients both optimisers stepped with: ours, laid out like `module` and mapped by `to_sb3`, against
    SB3's, laid out like `sb3_module`."""
    grads = copy.deepcopy(module)
    for param, grad in zip(grads.parameters(), ours.grads[-1]):
        param.data = grad
    assert_close(to_sb3(grads), dict(zip(sb3_module.state_dict(), theirs.grads[-1])), f"{where} gradients")


def assert_close(ours: dict, theirs: dict, where: str):
    assert ours.keys() == theirs.keys(), where
    for key in ours:
        scale = theirs[key].detach().abs().max().item()  # the bound is relative to the tensor's own scale
        torch.testing.assert_close(ours[key].detach().double(), theirs[key].detach().double(), rtol=TOLERANCE,
                                   atol=TOLERANCE * scale,
                                   msg=lambda text: f"{where} {key}: {text}")


def load(module: torch.nn.Module, state: dict):
    module.load_state_dict({key: value.detach().clone() for key, value in state.items()})


class StepGrads:
    """The gradients an optimiser steps with, captured at each `step()` (a step pre-hook)."""

    def __init__(self, optimizer):
        self.grads = []
        optimizer.register_step_pre_hook(lambda opt, *_: self.grads.append(
            [p.grad.detach().clone() for group in opt.param_groups for p in group["params"]]))


def sb3_model(algorithm, args, monkeypatch, float64: bool, **kwargs):
    """An SB3 model with our settings; with `float64`, computing in float64: its policy is cast to float64 and its
    observation preprocessing (a cast to float32 for Box spaces) is left out."""
    import stable_baselines3.common.policies

    if float64:
        monkeypatch.setattr(stable_baselines3.common.policies, "preprocess_obs", lambda obs, *_, **__: obs)
    model = algorithm("MlpPolicy", gym.make(args.env_id), learning_starts=0, batch_size=args.batch_size, tau=args.tau,
                      gamma=args.gamma, device="cpu", **kwargs)
    model.set_logger(configure(folder=None, format_strings=[]))
    if float64:
        model.policy.double()
    return model


def logged(model, name: str) -> torch.Tensor:
    """A loss SB3's `train` logged for its last step, e.g. "critic_loss"."""
    return torch.tensor(model.logger.name_to_value[f"train/{name}"], dtype=torch.float32)


def feed(model, batch):
    """SB3's replay buffer hands `batch` (our row layout, in the model's precision) to the next `train` step."""
    dtype = next(model.policy.parameters()).dtype
    obs, actions, rewards, terminations, next_obs = (tensor.to(dtype) for tensor in batch)
    model.replay_buffer.sample = lambda *_, **__: ReplayBufferSamples(obs, actions, next_obs, terminations, rewards,
                                                                      None)


def test_sac_update_equals_stable_baselines3(in_tmp, monkeypatch):
    """SAC: critic target and loss, actor loss, their gradients, Polyak targets equal SB3's `SAC.train` step for step.
    Two differences by design, pinned exactly here:
      * the temperature: SB3 minimises -(log alpha (log pi + H_bar)), whose gradient in log alpha lacks the factor
        alpha that Eq. (18)'s J(alpha) = -alpha (log pi + H_bar) has (ours): our gradient = alpha * SB3's, checked
        at every step; then SB3's log alpha is set to ours, so the other comparisons go on from the same alpha;
      * the order: SB3 steps alpha first, then the critics, then the actor; ours the critics, the actor, then alpha
        (the paper's order). Both use the alpha from before the step in the critic target and the actor loss, so the
        order changes nothing else: the equalities below show it.
    SB3 adds 1e-6 inside log(1 - tanh(u)^2); ours is the exact formula: set to 0 in SB3 for the comparison."""
    args = sac.Args(env_id="HalfCheetah-v5", total_timesteps=60 + STEPS, learning_starts=60, batch_size=32,
                    hidden_dim=32, eval_every=10_000, eval_episodes=1, log_every=10_000, seed=3, cuda=False)
    real_update, real_randn_like, seen = sac.update, torch.randn_like, {}

    def lockstep(actor, qf, qf_target, log_alpha, optimizers, batch, step, args, target_entropy, losses):
        if not seen:  # the SB3 model starts from our initial weights
            model = seen["model"] = sb3_model(
                sb3.SAC, args, monkeypatch, True, learning_rate=args.q_lr, ent_coef=f"auto_{args.initial_alpha}",
                target_entropy=target_entropy, policy_kwargs=dict(net_arch=[32, 32]))
            model.actor.action_dist.epsilon = 0.0
            load(model.actor, sac_actor_to_sb3(actor))
            load(model.critic, stacked_to_sb3(qf)), load(model.critic_target, stacked_to_sb3(qf_target))
            model.log_ent_coef.data = log_alpha.detach().double().reshape(1)
            seen.update(ours=[StepGrads(optimizer) for optimizer in optimizers],
                        theirs=[StepGrads(optimizer) for optimizer in (model.critic.optimizer, model.actor.optimizer,
                                                                       model.ent_coef_optimizer)])
        model, noise = seen["model"], []
        alpha = log_alpha.detach().exp()

        def recording_randn_like(tensor, *a, **k):
            noise.append(real_randn_like(tensor, *a, **k))
            return noise[-1]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "randn_like", recording_randn_like)
            metrics = real_update(actor, qf, qf_target, log_alpha, optimizers, batch, step, args, target_entropy,
                                  losses)
        # Ours draws the noise of a' ~ pi(.|s') (critic target) first, then that of the actor step; SB3 the other way.
        assert len(noise) == 2
        queue = [noise[1].double(), noise[0].double()]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.distributions.Normal, "rsample", lambda self, *_: self.loc + queue.pop(0) * self.scale)
            feed(model, batch)
            model.train(gradient_steps=1, batch_size=args.batch_size)
        assert_close(stacked_to_sb3(qf), model.critic.state_dict(), f"critics, step {step}")
        assert_close(stacked_to_sb3(qf_target), model.critic_target.state_dict(), f"target critics, step {step}")
        assert_close(sac_actor_to_sb3(actor), model.actor.state_dict(), f"actor, step {step}")
        assert_close({"critic": metrics["qf_losses"].sum(), "actor": metrics["actor_loss"]},
                     {"critic": logged(model, "critic_loss"),
                      "actor": logged(model, "actor_loss")}, f"losses {step}")
        assert_same_step_grads(seen["ours"][0], seen["theirs"][0], qf, model.critic, stacked_to_sb3, f"critic {step}")
        assert_same_step_grads(seen["ours"][1], seen["theirs"][1], actor, model.actor, sac_actor_to_sb3,
                               f"actor {step}")
        # The temperature, pinned: our gradient is alpha times SB3's; then SB3 continues from our log alpha.
        assert_close({"log_alpha": seen["ours"][2].grads[-1][0].reshape(1)},
                     {"log_alpha": alpha * seen["theirs"][2].grads[-1][0]}, f"temperature gradient {step}")
        with torch.no_grad():
            model.log_ent_coef.copy_(log_alpha.detach().double().reshape(1))
        seen["steps"] = seen.get("steps", 0) + 1
        return metrics

    monkeypatch.setattr(sac, "update", lockstep)
    sac.main(args)
    assert seen["steps"] == STEPS


def test_td3_update_equals_stable_baselines3(in_tmp, monkeypatch):
    """TD3: the critic update with target policy smoothing, and the delayed actor and target updates every
    `policy_frequency` critic updates, equal SB3's `TD3.train` step for step (parameters, losses, the gradients
    stepped with). The delay is decided by our training loop and by SB3 on its own, so an actor updated at another
    step fails the comparison."""
    args = td3.Args(env_id="HalfCheetah-v5", total_timesteps=60 + STEPS, learning_starts=60, batch_size=32,
                    hidden_dims=(32, 32), eval_every=10_000, eval_episodes=1, log_every=10_000, seed=3, cuda=False)
    real_update, real_randn_like, seen = td3.update, torch.randn_like, {}

    def lockstep(rb, actor, actor_target, qf, qf_target, actor_optimizer, q_optimizer, args, update_actor):
        if not seen:
            model = seen["model"] = sb3_model(
                sb3.TD3, args, monkeypatch, False, learning_rate=args.q_lr, policy_delay=args.policy_frequency,
                target_policy_noise=args.policy_noise, target_noise_clip=args.noise_clip,
                policy_kwargs=dict(net_arch=[32, 32]))
            load(model.actor, td3_actor_to_sb3(actor)), load(model.actor_target, td3_actor_to_sb3(actor_target))
            load(model.critic, stacked_to_sb3(qf)), load(model.critic_target, stacked_to_sb3(qf_target))
            seen.update(ours=[StepGrads(q_optimizer), StepGrads(actor_optimizer)],
                        theirs=[StepGrads(model.critic.optimizer), StepGrads(model.actor.optimizer)])
        model, noise_states = seen["model"], []
        sampled = []
        real_sample = rb.sample

        def recording_sample(batch_size):
            sampled.append(real_sample(batch_size))
            return sampled[-1]

        def recording_randn_like(tensor, *a, **k):
            noise_states.append(torch.get_rng_state())  # SB3 draws its smoothing noise from the same state
            return real_randn_like(tensor, *a, **k)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(rb, "sample", recording_sample)
            patch.setattr(torch, "randn_like", recording_randn_like)
            metrics = real_update(rb, actor, actor_target, qf, qf_target, actor_optimizer, q_optimizer, args,
                                  update_actor)
        after = torch.get_rng_state()
        assert len(noise_states) == 1
        torch.set_rng_state(noise_states[0])
        feed(model, sampled[0])
        model.train(gradient_steps=1, batch_size=args.batch_size)
        torch.set_rng_state(after)
        step = seen["steps"] = seen.get("steps", 0) + 1
        assert_close(stacked_to_sb3(qf), model.critic.state_dict(), f"critics, step {step}")
        assert_close(stacked_to_sb3(qf_target), model.critic_target.state_dict(), f"target critics, step {step}")
        assert_close(td3_actor_to_sb3(actor), model.actor.state_dict(), f"actor, step {step}")
        assert_close(td3_actor_to_sb3(actor_target), model.actor_target.state_dict(), f"target actor, step {step}")
        assert len(seen["ours"][1].grads) == len(seen["theirs"][1].grads), f"actor steps differ at step {step}"
        assert_close({"critic": metrics["qf_losses"].sum()},
                     {"critic": logged(model, "critic_loss")}, f"loss {step}")
        if update_actor:
            assert_close({"actor": metrics["actor_loss"]},
                         {"actor": logged(model, "actor_loss")}, f"loss {step}")
        assert_same_step_grads(seen["ours"][0], seen["theirs"][0], qf, model.critic, stacked_to_sb3, f"critic {step}")
        if update_actor:
            assert_same_step_grads(seen["ours"][1], seen["theirs"][1], actor, model.actor, td3_actor_to_sb3,
                                   f"actor {step}")
        return metrics

    monkeypatch.setattr(td3, "update", lockstep)
    td3.main(args)
    assert seen["steps"] == STEPS and len(seen["ours"][1].grads) == STEPS // args.policy_frequency
