"""The CUDA path of all four scripts. Skipped without a CUDA GPU (CI has none); run on a machine with one.

Each script trains briefly on the GPU, in-process, while every gradient step (`update` / `train_step`) runs under
`torch.cuda.set_sync_debug_mode("error")`: a step that waits for the device (`.item()`, a device-to-host copy, a
data-dependent shape) fails the test. Then the run's checkpoint, written from the GPU, is evaluated on the CPU
through the real command line."""

import contextlib
import glob

import pytest
import torch
from conftest import run_script

import decision_diffuser as dd
import decision_transformer as dt
import sac_continuous as sac
import td3_continuous as td3

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def watch_steps(monkeypatch, module, name: str) -> list:
    """Run every call of `module.<name>` (the gradient step that main() calls) under no_host_sync; count the calls."""
    calls, step = [], getattr(module, name)

    def checked(*args, **kwargs):
        with no_host_sync():
            result = step(*args, **kwargs)
        calls.append(1)
        return result

    monkeypatch.setattr(module, name, checked)
    return calls


def evaluate_on_cpu(script: str, cwd, *extra: str) -> str:
    checkpoint = glob.glob(f"{cwd}/runs/*/{script}.pt")
    assert len(checkpoint) == 1, checkpoint
    return run_script(f"{script}.py", "--eval-checkpoint", checkpoint[0], "--eval-episodes", "1", "--no-cuda", *extra,
                      cwd=str(cwd)).stdout


@pytest.mark.parametrize("module", [sac, td3], ids=["sac", "td3"])
def test_online_scripts_train_on_cuda_without_host_syncs(module, in_tmp, monkeypatch, capsys):
    calls = watch_steps(monkeypatch, module, "update")
    common = dict(env_id="Pendulum-v1", total_timesteps=400, learning_starts=100, batch_size=64, eval_every=200,
                  eval_episodes=1, log_every=100, save_model=True, cuda=True)
    sizes = dict(hidden_dim=64) if module is sac else dict(hidden_dims=(64, 64))
    returns = module.main(module.Args(**common, **sizes))
    assert "device cuda" in capsys.readouterr().out and len(calls) == 300 and returns.shape == (1,)
    assert "evaluation of" in evaluate_on_cpu(module.SCRIPT, in_tmp)


def test_decision_transformer_trains_on_cuda_without_host_syncs(inverted_pendulum_random_npz, in_tmp, monkeypatch,
                                                                capsys):
    calls = watch_steps(monkeypatch, dt, "train_step")
    dt.main(dt.Args(dataset=inverted_pendulum_random_npz, total_steps=40, eval_every=20, log_every=10, context_len=5,
                    embed_dim=32, n_layers=1, batch_size=16, warmup_steps=10, eval_episodes=1,
                    target_returns=[100.0], save_model=True, cuda=True))
    assert "device cuda" in capsys.readouterr().out and len(calls) == 40
    assert "target 100" in evaluate_on_cpu(dt.SCRIPT, in_tmp)


def test_decision_diffuser_trains_on_cuda_without_host_syncs(inverted_pendulum_random_npz, in_tmp, monkeypatch,
                                                             capsys):
    calls = watch_steps(monkeypatch, dd, "train_step")
    dd.main(dd.Args(dataset=inverted_pendulum_random_npz, horizon=4, dim=16, dim_mults=(1, 2), n_diffusion_steps=10,
                    batch_size=16, ema_start=10, ema_every=5, sampler="ddim", sampling_steps=4, eval_episodes=1,
                    inv_hidden_dim=32, cdf_knots=101, total_steps=30, eval_every=15, log_every=10, save_model=True,
                    cuda=True))
    assert "device cuda" in capsys.readouterr().out and len(calls) == 30
    assert "evaluation of" in evaluate_on_cpu(dd.SCRIPT, in_tmp, "--sampler", "ddim", "--sampling-steps", "4")
