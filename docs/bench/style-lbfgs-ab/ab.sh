#!/bin/bash
# same-sitting A/B of the style optimiser, interleaved: old = a git worktree at /tmp/oldtree of commit 9969e82
# (torch.optim.LBFGS), new = this tree (models/lbfgs.py's CompactLBFGS). Outputs: {old,new}-{1,2}.json here
cd /work/main
for r in 1 2; do
  for side in old new; do
    dir=/work/main; [[ $side == old ]] && dir=/tmp/oldtree
    (cd $dir && /work/main/.venv/bin/python -m bench.style_speed --size 256 --steps 100 --device cpu --variants ours \
      --content /work/shared/data/style/content/tubingen.jpg --style /work/shared/data/style/style/starry_night_vangogh.jpg \
      --json /work/main/docs/bench/style-lbfgs-ab/$side-$r.json) > /tmp/style-ab-$side-$r.log 2>&1
  done
done
