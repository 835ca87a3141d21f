#!/bin/bash
# one sitting: /classify served by one process, then by 1 and 2 front workers in front of one model process
cd /work/main
IMG=/work/shared/data/cifar10/train/bird/0338.jpg
for fw in 0 1 2; do
  .venv/bin/python -m bench.classify_load --matrix --model cifar10-resnet20 --batching on --concurrency 1,8,32 \
    --duration 20 --warmup 3 --device cpu --image $IMG --front-workers $fw \
    --json docs/bench/front-workers-cpu-fw$fw.json --markdown docs/bench/front-workers-cpu-fw$fw.md
done
