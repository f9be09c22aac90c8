#!/usr/bin/env bash
# Offline learning evidence on a CPU: a HalfCheetah-v5 dataset written by our own SAC, then the Decision Transformer
# and the Decision Diffuser (small configuration) trained on it. One torch thread per job (the RESULTS.md runs
# shared the 2 cores with other jobs). Logs: benchmarks/logs/; datasets: benchmarks/data/ (not committed).
# Usage: bash benchmarks/offline.sh [data|dt|dd|seeds|all]
#   data, dt, dd: the dataset, then one seed of each script; seeds: both scripts over seeds 1, 2 and 3 through
#   benchmarks/reproduce.py (two runs at a time, one thread each), into benchmarks/results/offline_{dt,dd}/.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
export OMP_NUM_THREADS=1
replay=benchmarks/data/halfcheetah_sac_replay_100k.npz

# The official model (K = 20, 128 dims, 3 layers, 1 head, dropout 0.1) on a CPU budget: 8000 steps of batch 32 at
# lr 3e-4 with 800 warm-up steps (official: 100k steps of batch 64 at lr 1e-4 with 10k warm-up), official
# halfcheetah targets 12000 and 6000, 10 evaluation episodes per target (official: 100).
dt_steps=8000
dt_flags=(--batch-size 32 --warmup-steps 800 --learning-rate 3e-4 --eval-every 4000 --eval-episodes 10 --log-every 500)
# A small configuration for HalfCheetah: horizon 4 (as in DI-engine's Decision Diffuser config for halfcheetah;
# 16 and 8 did worse here, see RESULTS.md), a 0.27M-parameter U-Net, 20 diffusion steps, DDIM with 10 steps at
# evaluation, the released CDF normaliser, 30k steps of batch 64 at lr 1e-3.
dd_steps=30000
dd_flags=(--horizon 4 --dim 32 --dim-mults 1 2 --n-diffusion-steps 20 --batch-size 64 --gradient-accumulate-every 1
  --ema-start 500 --learning-rate 1e-3 --normalizer cdf --sampler ddim --sampling-steps 10 --eval-every 10000
  --eval-episodes 10 --log-every 2000)

if [[ $what == data || $what == all ]]; then
  # 100k SAC steps: every transition ("medium-replay" style; set B of RESULTS.md: returns from -439.5 to 5045.4),
  # and 100k steps of the final stochastic policy ("medium" style, returns about 5100).
  python sac_continuous.py --env-id HalfCheetah-v5 --seed 1 --total-timesteps 100000 --eval-every 20000 \
    --eval-episodes 5 --log-every 10000 --export-replay "$replay" \
    --export-rollouts benchmarks/data/halfcheetah_sac_medium_100k.npz --export-rollout-steps 100000 \
    > benchmarks/logs/sac_halfcheetah-v5_seed1_100k_dataset-export.log 2>&1
fi
if [[ $what == dt || $what == all ]]; then
  python decision_transformer.py --dataset "$replay" --total-steps $dt_steps "${dt_flags[@]}" --save-model \
    > benchmarks/logs/dt_halfcheetah-sac-replay_seed1_8k.log 2>&1
fi
if [[ $what == dd || $what == all ]]; then
  python decision_diffuser.py --dataset "$replay" --total-steps $dd_steps "${dd_flags[@]}" --save-model \
    > benchmarks/logs/dd_halfcheetah-sac-replay_h4_cdf_seed1_30k.log 2>&1
fi
if [[ $what == seeds ]]; then
  python benchmarks/reproduce.py --scripts decision_transformer.py --datasets "$replay" --seeds 1 2 3 \
    --total-timesteps $dt_steps --workers 2 --output-dir benchmarks/results/offline_dt -- "${dt_flags[@]}"
  python benchmarks/reproduce.py --scripts decision_diffuser.py --datasets "$replay" --seeds 1 2 3 \
    --total-timesteps $dd_steps --workers 2 --output-dir benchmarks/results/offline_dd -- "${dd_flags[@]}"
  exit
fi
grep -H "final evaluation" benchmarks/logs/dt_halfcheetah-sac-replay_seed1_8k.log \
  benchmarks/logs/dd_halfcheetah-sac-replay_h4_cdf_seed1_30k.log 2>/dev/null || true
