#!/usr/bin/env bash
# Learning evidence for td3_continuous.py: Hopper-v5 and HalfCheetah-v5, 300k steps, defaults of the authors' code (sfujim/TD3), evaluation of
# the deterministic policy (10 episodes) every 10k steps. The two runs go in parallel, one torch thread each
# (OMP_NUM_THREADS=1), which on a 2-core machine finishes sooner than two 2-thread runs one after the other.
# Usage: bash benchmarks/td3_learning.sh [SEED] [STEPS]     (logs: benchmarks/logs/td3_<env>_seed<SEED>.log)
set -euo pipefail
cd "$(dirname "$0")/.."
seed=${1:-1}
steps=${2:-300000}
for env in Hopper-v5 HalfCheetah-v5; do
  OMP_NUM_THREADS=1 python td3_continuous.py --env-id "$env" --seed "$seed" --total-timesteps "$steps" \
    --eval-every 10000 --eval-episodes 10 --log-every 10000 \
    > "benchmarks/logs/td3_${env%%-*}_seed${seed}.log" 2>&1 &
done
wait
grep -H "eval at step \(100000\|300000\)\|final evaluation" benchmarks/logs/td3_*_seed"${seed}".log
