#!/usr/bin/env bash
# The built-in demo (`make demo`): generate a small image folder, convert it to TFRecords, train both
# phases for a few steps, export, and label one image. Runs on a laptop CPU in about a minute; needs no
# download (random-initialised backbone, so accuracy is only a little above chance: the point is the path).
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-demo_output}
PYTHON=${PYTHON:-python}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

if [ -e "$DEMO_DIR" ]; then
  echo "== removing the previous demo output in $DEMO_DIR"
  rm -rf "$DEMO_DIR"
fi

echo "== 1/4 writing a demo image folder (3 classes of shapes) to $DEMO_DIR/images"
$PYTHON -m tfrecords.demo_images --output_dir="$DEMO_DIR/images" --num_per_class=60

echo "== 2/4 converting it to sharded TFRecords in $DEMO_DIR/tfrecords"
$PYTHON -m tfrecords.build --input_dir="$DEMO_DIR/images" --output_dir="$DEMO_DIR/tfrecords" \
  --num_shards=2 --stderrthreshold=error

echo "== 3/4 two-phase transfer learning (mobilenet_v2, random weights, 64 px) into $DEMO_DIR/model"
$PYTHON -m trainer.train --data_dir="$DEMO_DIR/tfrecords" --model_dir="$DEMO_DIR/model" \
  --backbone=mobilenet_v2 --weights=none --image_size=64 --batch_size=16 \
  --epochs=3 --fine_tune_epochs=2 --learning_rate=3e-3 --stderrthreshold=error

IMAGE=$(find "$DEMO_DIR/images/circle" -type f | sort | head -n 1)
echo "== 4/4 labelling $IMAGE with the exported SavedModel"
$PYTHON -m trainer.predict --model_dir="$DEMO_DIR/model" "$IMAGE" --stderrthreshold=error

cat <<DONE

Demo finished. Everything is under $DEMO_DIR/:
  images/                 the generated image folder (one subfolder per class)
  tfrecords/              train/validation/test shards, labels.txt, manifest.json
  model/saved_model/      the exported SavedModel (serving signature: encoded image bytes in, labels out)
  model/model.keras       the trained Keras model
  model/metrics.json      test accuracy and per-epoch history of both phases
  model/logs/             TensorBoard logs:  tensorboard --logdir $DEMO_DIR/model/logs
  model/flags.txt         the resolved flags (reuse with --flagfile)
DONE
