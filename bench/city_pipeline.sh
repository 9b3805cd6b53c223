#!/usr/bin/env bash
# The whole pipeline on the `city` preset on one GPU, briefly trained: partition, 4 cells, merge, evaluation with
# one process and with torch.distributed.run --nproc_per_node 2 sharing the GPU, render speed.
# Usage: bash bench/city_pipeline.sh WORK OUT [ITERATIONS]
set -euo pipefail
work=$1; out=$2; iters=${3:-300}
export TQDM_DISABLE=1
python3 -c "from mega_nerf.synthetic import generate_city; generate_city('$work/city-data', preset='${PRESET:-city}', write_depth=False, progress=False)"
data=$work/city-data; cfg=$data/config.yaml
[ -f $work/masks/params.pt ] || python3 scripts/create_cluster_masks.py --config_file $cfg --dataset_path $data --output $work/masks --grid_dim 2 2 --ray_samples 256 | tail -2
for k in 0 1 2 3; do
  python3 mega_nerf/train.py --config_file $cfg --dataset_path $data --exp_name $work/exp-$k --chunk_paths $work/chunks-$k \
    --cluster_mask_path $work/masks/$k --batch_size ${BATCH:-16384} --train_iterations $iters --val_interval 100000 --no_progress | tail -1
done
python3 scripts/merge_submodules.py --config_file $cfg --ckpt_prefix $work/exp- --centroid_path $work/masks/params.pt --output $work/merged.pt
ls -l $work/merged.pt | tee $out/merged_size.txt
/usr/bin/time -f "eval 1 process: %e s" python3 mega_nerf/eval.py --config_file $cfg --dataset_path $data --container_path $work/merged.pt --exp_name $work/eval1 --no_progress 2>&1 | tail -4
cp $work/eval1/metrics.json $out/metrics1.json
/usr/bin/time -f "eval 2 processes: %e s" python3 -m torch.distributed.run --standalone --nproc_per_node 2 mega_nerf/eval.py --config_file $cfg --dataset_path $data --container_path $work/merged.pt --exp_name $work/eval2 --no_progress 2>&1 | tail -3
cp $work/eval2/metrics.json $out/metrics2.json
python3 -c "import json; a, b = (json.load(open('$out/metrics%d.json' % i)) for i in (1, 2)); print('identical metrics.json:', a == b)"
python3 bench/render_speed.py --container_path $work/merged.pt --dataset_path $data --results $out/RESULTS.md | tail -4
cp $work/eval1/compare/$(ls $work/eval1/compare | head -1) $out/compare.png
