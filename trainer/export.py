r"""Export: a SavedModel a client can send image files to, and the `.keras` model file.

The SavedModel's `serving_default` signature takes a batch of encoded images (JPEG, PNG, GIF, BMP bytes)
and returns, per image, the class id, the class name and the probabilities, with decoding, resizing and
the backbone's preprocessing all inside, so a client sends a file and gets a label:

    saved_model_cli run --dir <model_dir>/saved_model --tag_set serve --signature_def serving_default \
        --input_exprs 'image_bytes=[open("cat.jpg","rb").read()]'
"""

import keras
import tensorflow as tf

from trainer import data

SAVED_MODEL_DIR = "saved_model"
KERAS_MODEL_FILE = "model.keras"


def export_saved_model(*, model: keras.Model, class_names: list[str], image_size: int, export_dir: str) -> None:
    """Writes a SavedModel with a `serving_default` signature over encoded image bytes.

    Args:
        model: the trained classifier (float RGB [0, 255] images in, probabilities out).
        class_names: class names in label-id order.
        image_size: the model's input height and width.
        export_dir: destination folder (local or gs://).
    """
    names = tf.constant(class_names)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes):
        images = tf.map_fn(
            lambda encoded: data.decode_and_resize(encoded, image_size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )
        probabilities = model(images, training=False)
        class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {
            "class_ids": class_ids,
            "class_names": tf.gather(names, class_ids),
            "probabilities": probabilities,
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serving_default", fn=serve)
    archive.write_out(export_dir, verbose=False)


def load_serving_function(export_dir: str):
    """Loads an exported SavedModel's `serving_default` signature (bytes in, dict of tensors out)."""
    if not tf.io.gfile.exists(tf.io.gfile.join(export_dir, "saved_model.pb")):
        raise ValueError(f"no SavedModel in {export_dir!r}; train first: python -m trainer.train ...")
    return tf.saved_model.load(export_dir).signatures["serving_default"]
