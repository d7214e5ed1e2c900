#!/usr/bin/env bash
# The GPU checks in one script of at most 8 minutes on one H100/H200-class GPU, from the repository root:
#
#   bash examples/gpu_benchmarks.sh OUTPUT_DIR           # on a machine with CUDA
#   bash examples/gpu_benchmarks.sh OUTPUT_DIR --smoke   # the same parts, tiny, on the CPU (16 min on 2 shared cores)
#
# 1. adapter.md/.json: examples/benchmark_adapter.py on the CIFAR-size 32x32 UNet, batch 128, 20 classes in the mixed
#    batches, fp32 and bf16 autocast, every family eager, PEFT LoRA r=1 as the sampling peer, and the aten op counts;
# 2. protocol_speed.json: examples/protocol_speed.py, steps per second of task 0 and task 1 of --recipe cifar100
#    (batch 160, bf16, EMA) and the projected hours of the whole protocol;
# 3. compiled.md/.json: the same benchmark for cos in bf16, eager against torch.compile (compiling the training step
#    and the sampling forward of this UNet takes minutes: on an H200 with torch 2.11, fp32 and bf16 together had not
#    finished compiling after 320 s).
#
# Each part has its own time limit, and a part that fails or runs out of time does not stop the next one; summary.txt
# gets the versions and each part's exit status, logs.txt the parts' logs.
set -u
out=${1:?usage: bash examples/gpu_benchmarks.sh OUTPUT_DIR [--smoke]}
smoke=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: > "$summary"
: > "$out/logs.txt"

if [ "$smoke" = "--smoke" ]; then
    device=(--device cpu --sizes 16x16 --num_threads 1)
    rounds=(--warmup 1 --repeats 1)
    speed=(--steps 3 --warmup_steps 2 --images_per_class 4 -- --block_out_channels 32,64,64,64 --norm_num_groups 8
           --attention_head_dim 8 --train_batch_size 8 --classes_per_task 4 --num_threads 1)
    scale=8  # the time limits, on a shared CPU
else
    device=(--device cuda --sizes 32x32)
    rounds=(--warmup 3 --repeats 7)
    speed=(--steps 100 --warmup_steps 20)
    scale=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$summary" 2>&1
fi
python3 -c "import sys, torch, diffusers, peft, accelerate; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" \
    >> "$summary" 2>&1

part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time limit, its exit status into the summary
    local name=$1 seconds=$(($2 * scale)) started=$SECONDS
    shift 2
    timeout "$seconds" "$@"
    echo "$name: exit status $? after $((SECONDS - started)) s (limit $seconds s)" >> "$summary"
}

part adapter 150 python3 examples/benchmark_adapter.py "${device[@]}" "${rounds[@]}" --classes 20 --precision both \
    --many_classes none --output "$out/adapter.json" > "$out/adapter.md" 2>> "$out/logs.txt"
part protocol_speed 150 python3 examples/protocol_speed.py --output_dir "$out/protocol_speed_run" \
    --output "$out/protocol_speed.json" "${speed[@]}" >> "$out/logs.txt" 2>&1
rm -rf "$out/protocol_speed_run"
part compiled 180 python3 examples/benchmark_adapter.py "${device[@]}" "${rounds[@]}" --classes 20 --precision bf16 \
    --functions cos --compile --no-lora_peer --no-op_counts --many_classes none --output "$out/compiled.json" \
    > "$out/compiled.md" 2>> "$out/logs.txt"
cat "$summary"
