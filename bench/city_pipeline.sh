#!/usr/bin/env bash
# The whole pipeline on the `city` preset on one GPU, briefly trained: partition (2x2), 4 cells, merge, evaluation
# with one process and with torch.distributed.run --nproc_per_node 2 sharing the GPU, then render speed, the exported
# point cloud against the true surfaces (the city is generated with depth maps), and data speed.
# Usage: bash bench/city_pipeline.sh WORK OUT [ITERATIONS]   (OUT gets metrics, tables and a compare image)
set -euo pipefail
work=$1; out=$2; iters=${3:-1000}
export TQDM_DISABLE=1
stamp() { echo "[$(date +%T)] $*"; }
data=$work/city-data; cfg=$data/config.yaml; masks=$work/masks-2x2  # the names bench/common.py uses
[ -f $data/coordinates.pt ] || python3 -c "from mega_nerf.synthetic import generate_city; generate_city('$data', preset='${PRESET:-city}', write_depth=True, progress=False)"
stamp generated
[ -f $masks/params.pt ] || python3 scripts/create_cluster_masks.py --config_file $cfg --dataset_path $data --output $masks --grid_dim 2 2 --ray_samples 256 --no_progress | tail -2
stamp partitioned
for k in 0 1 2 3; do
  python3 mega_nerf/train.py --config_file $cfg --dataset_path $data --exp_name $work/exp-$k --chunk_paths $work/chunks-$k \
    --cluster_mask_path $masks/$k ${BATCH:+--batch_size $BATCH} --train_iterations $iters --val_interval 100000 --no_progress | tail -1
  stamp "trained cell $k"
done
python3 scripts/merge_submodules.py --config_file $cfg --ckpt_prefix $work/exp- --centroid_path $masks/params.pt --output $work/merged.pt
ls -l $work/merged.pt | tee $out/merged_size.txt
for n in 1 2; do
  start=$SECONDS
  if [ $n = 1 ]; then launch=python3; else launch="python3 -m torch.distributed.run --standalone --nproc_per_node 2"; fi
  $launch mega_nerf/eval.py --config_file $cfg --dataset_path $data --container_path $work/merged.pt --exp_name $work/eval$n --no_progress 2>&1 | tail -6
  echo "eval with $n process(es): $((SECONDS - start)) s wall (process start included)"
  cp $work/eval$n/metrics.json $out/metrics$n.json
done
python3 -c "import json; a, b = (json.load(open('$out/metrics%d.json' % i)) for i in (1, 2)); print('identical metrics.json:', a == b, a['mean'], b['mean'])"
cp $work/eval1/compare/$(ls $work/eval1/compare | head -1) $out/compare.png
for chunk in 262144 524288 1048576; do
  python3 bench/render_speed.py --container_path $work/merged.pt --dataset_path $data --chunk $chunk --results $out/RESULTS.md | tail -3
done
stamp rendered
python3 bench/export_quality.py --container_path $work/merged.pt --dataset_path $data --results $out/RESULTS.md | tail -6
stamp exported
python3 bench/data_speed.py --preset city --work $work --results $out/RESULTS.md | tail -4
stamp done
