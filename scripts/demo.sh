#!/usr/bin/env bash
# The built-in demo (`make demo`): generate a small image folder, convert it to TFRecords, train both
# phases for a few steps, export, and label one image. A few minutes on a laptop CPU.
# With internet access it uses ImageNet weights for MobileNetV2 (a 9 MB download) and learns the shapes;
# without, it falls back to random weights, and accuracy stays near chance: the path is the same.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-demo_output}
PYTHON=${PYTHON:-python}
IMAGE_SIZE=96
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

# Runs one step with its log (stderr) in $DEMO_DIR/logs/<name>.log; shows the log's end if it fails.
step() {
  local name=$1
  shift
  if ! "$@" 2>"$DEMO_DIR/logs/$name.log"; then
    tail -n 25 "$DEMO_DIR/logs/$name.log"
    echo "demo step '$name' failed; full log: $DEMO_DIR/logs/$name.log" >&2
    exit 1
  fi
}

if [ -e "$DEMO_DIR" ]; then
  echo "== removing the previous demo output in $DEMO_DIR"
  rm -rf "$DEMO_DIR"
fi
mkdir -p "$DEMO_DIR/logs"

echo "== 1/5 writing a demo image folder (3 classes of drawn shapes) to $DEMO_DIR/images"
step images $PYTHON -m tfrecords.demo_images --output_dir="$DEMO_DIR/images" --num_per_class=60

echo "== 2/5 converting it to sharded TFRecords in $DEMO_DIR/tfrecords"
step build $PYTHON -m tfrecords.build --input_dir="$DEMO_DIR/images" --output_dir="$DEMO_DIR/tfrecords" --num_shards=2

echo "== 3/5 fetching ImageNet weights for MobileNetV2 (needs internet; cached in ~/.keras/models)"
if $PYTHON -c "import keras; keras.applications.MobileNetV2(include_top=False, input_shape=($IMAGE_SIZE, $IMAGE_SIZE, 3))" \
  2>"$DEMO_DIR/logs/weights.log"; then
  WEIGHTS=imagenet
  echo "   ok: transfer learning from ImageNet"
else
  WEIGHTS=none
  echo "   no internet (see $DEMO_DIR/logs/weights.log): random weights instead, so accuracy stays near chance"
fi

echo "== 4/5 two-phase transfer learning (mobilenet_v2, weights=$WEIGHTS, $IMAGE_SIZE px) into $DEMO_DIR/model"
step train $PYTHON -m trainer.train --data_dir="$DEMO_DIR/tfrecords" --model_dir="$DEMO_DIR/model" \
  --backbone=mobilenet_v2 --weights=$WEIGHTS --image_size=$IMAGE_SIZE --batch_size=16 \
  --epochs=3 --fine_tune_epochs=2 --learning_rate=3e-3

IMAGE=$(find "$DEMO_DIR/images/circle" -type f -name '*.jpg' | sort | head -n 1)
echo "== 5/5 labelling $IMAGE with the exported SavedModel"
step predict $PYTHON -m trainer.predict --model_dir="$DEMO_DIR/model" "$IMAGE"

echo "== the evaluation report ($DEMO_DIR/model/evaluation.txt)"
cat "$DEMO_DIR/model/evaluation.txt"

cat <<DONE

Demo finished. Everything is under $DEMO_DIR/:
  images/                 the generated image folder (one subfolder per class)
  tfrecords/              train/validation/test shards, labels.txt, manifest.json
  model/saved_model/      the exported SavedModel (serving signature: encoded image bytes in, labels out)
  model/model.keras       the trained Keras model
  model/metrics.json      test accuracy, per-phase accuracies and the per-epoch history
  model/evaluation.*      the test report: per-class precision/recall/F1, confusion matrix (.txt, .json)
  model/*.png             confusion_matrix.png, errors.png (worst mistakes), learning_curves.png
  model/logs/             TensorBoard logs:  tensorboard --logdir $DEMO_DIR/model/logs
  model/flags.txt         the resolved flags (rerun with --flagfile)
  logs/                   the log of each step
DONE
