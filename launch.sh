#!/usr/bin/env bash
# ./launch.sh CONFIG [section.key=value ...]
#
# Thin wrapper over `accelerate launch -m tl_dist.train`: one process per GPU on this machine,
# one CPU process where there is no GPU. Multi-node settings come from the environment:
#   NUM_MACHINES (1)  MACHINE_RANK (0)  MAIN_PROCESS_IP (127.0.0.1)  MAIN_PROCESS_PORT (29500)
#   NUM_GPUS (GPUs per machine; detected)  PYTHON (python)
# Anything in ACCELERATE_ARGS is passed to `accelerate launch` as is.
set -euo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: ./launch.sh CONFIG.yaml [section.key=value ...]" >&2
  exit 2
fi
config=$1
shift
if [ ! -f "$config" ]; then
  echo "error: config file not found: $config" >&2
  exit 2
fi

PYTHON=${PYTHON:-python}
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-127.0.0.1}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}

if [ "$NUM_GPUS" -eq 0 ] && [ "$NUM_MACHINES" -eq 1 ]; then
  # No GPU: one CPU process (several CPU processes only slow each other down on one machine).
  exec "$PYTHON" -m tl_dist.train --config "$config" "$@"
fi

per_machine=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
total=$(( per_machine * NUM_MACHINES ))
multi=()
# --multi_gpu starts the processes; without CUDA, tl_dist itself asks accelerate for a gloo group.
[ "$total" -gt 1 ] && multi=(--multi_gpu)

# shellcheck disable=SC2086
exec "$PYTHON" -m accelerate.commands.launch "${multi[@]}" \
  --num_processes "$total" --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
  --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
  --mixed_precision no --dynamo_backend no ${ACCELERATE_ARGS:-} \
  -m tl_dist.train --config "$config" "$@"
