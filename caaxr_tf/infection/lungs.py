"""A lung run beside an infection run: lung probabilities, the map restricted to the lungs and
per-lung infected fractions, offline (numpy) and inside an exported graph (TensorFlow).

A *lung run* is a run folder of a segmentation model trained on a ``lungs`` protocol (e.g.
``covid-chestxray: lungs``, the lungVAE masks). Its input size may differ from the infection
run's: images are resized to the lung model's size and its probabilities back (bilinear).

* `LungRun`: loads a lung run and predicts lung probabilities for images of any size.
* `with_lung_model`: one Keras model ``images -> {"mask": infection map, "lungs": lung map}``
  from the infection model and the lung model; the export of an infection run with
  ``--lung-run`` serves this model, so both networks run in one serving graph.
* `served_lung_fractions`: the per-lung infected fractions in TensorFlow for the serving graph.
  It splits the lungs at the image's vertical midline (a connected-component split has no TF
  op); `caaxr_tf.infection.maps.split_lungs` splits by components first and falls back to the
  same midline, so both agree whenever each lung lies on its own half of the image.
* `lung_infection_features`: per-image ``[right, left, total]`` infected fractions, the feature
  the severity regression can use (numpy; components split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from caaxr_tf.infection.maps import _batch, lung_infection_fractions

LUNG_THRESHOLD = 0.5
FEATURE_NAMES = ("right_lung_infected_fraction", "left_lung_infected_fraction", "lungs_infected_fraction")


class LungRun:
    """The best model of a lung run folder; ``predict(images)`` gives lung probabilities
    ``[N, H, W, 1]`` at the images' own size (images: float ``[N, H, W, 1]`` in 0..255).

    ``run`` is an opened `caaxr_tf.runs.Run` (how evaluation, export and the severity features
    pass it), or a folder path: this module lies below the Run layer, so a path is read with
    `caaxr_tf.run_files` (config.yaml and the model, nothing else)."""

    def __init__(self, run: Any, which: str = "best"):
        if hasattr(run, "settings") and hasattr(run, "model"):  # a caaxr_tf.runs.Run
            self.run_dir = Path(run.path)
            task, protocol, size = run.settings.task, run.settings.protocol, run.settings.image_size
            load = run.model
        else:
            from caaxr_tf.run_files import load_run_config, load_run_model

            self.run_dir = Path(run)
            if not self.run_dir.is_dir():
                raise FileNotFoundError(f"lung run {self.run_dir} does not exist")
            config = load_run_config(self.run_dir)
            task, protocol = str(config.get("task") or ""), str(config.get("protocol") or "")
            size = int(config.get("image_size") or 224)

            def load(which: str):
                return load_run_model(self.run_dir, which)
        if task != "segmentation":
            raise ValueError(f"lung run {self.run_dir}: its task is {task!r}; a lung run is a segmentation run "
                             "on a lungs protocol (e.g. covid-chestxray lungs)")
        self.protocol, self.image_size = protocol, size
        self.model = load(which)
        self._predict: Callable[[Any], Any] | None = None

    def predict(self, images) -> np.ndarray:
        import tensorflow as tf

        if self._predict is None:
            model, size = self.model, self.image_size

            @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)], reduce_retracing=True)
            def step(batch):
                return resized_lung_probabilities(model, batch, size)

            self._predict = step
        return self._predict(tf.convert_to_tensor(np.asarray(images, np.float32))).numpy()


def resized_lung_probabilities(lung_model, images, lung_image_size: int):
    """Lung probabilities of ``images`` (``[N, H, W, 1]``, 0..255) at their own size: the images
    are resized to the lung model's input (bilinear), its output resized back."""
    import tensorflow as tf

    from caaxr_tf.models.outputs import mask_output

    height, width = tf.shape(images)[1], tf.shape(images)[2]
    inputs = tf.image.resize(images, [lung_image_size, lung_image_size], method="bilinear")
    lungs = tf.cast(mask_output(lung_model(inputs, training=False)), tf.float32)
    return tf.image.resize(lungs, [height, width], method="bilinear")


def with_lung_model(infection_model, lung_model, image_size: int, lung_image_size: int):
    """A functional Keras model ``images [N, S, S, 1] -> {"mask", "lungs"}`` running both models
    (the lung model at its own input size). A lung model named like the infection model is
    renamed ``lungs_<name>``."""
    import keras

    from caaxr_tf.models.outputs import mask_output

    if lung_model.name == infection_model.name:  # e.g. two "unet"s: a functional model needs unique names
        lung_model.name = f"lungs_{lung_model.name}"  # renamed in place; weights and config are untouched
    images = keras.Input((image_size, image_size, 1), name="images")
    infection = mask_output(infection_model(images))
    lung_inputs = images
    if lung_image_size != image_size:
        lung_inputs = keras.layers.Resizing(lung_image_size, lung_image_size, interpolation="bilinear",
                                            name="to_lung_size")(images)
    lungs = mask_output(lung_model(lung_inputs))
    if lung_image_size != image_size:
        lungs = keras.layers.Resizing(image_size, image_size, interpolation="bilinear", name="from_lung_size")(lungs)
    return keras.Model(images, {"mask": infection, "lungs": lungs}, name="infection_with_lungs")


def served_lung_fractions(maps, lungs, threshold: float, lung_threshold: float = LUNG_THRESHOLD):
    """TensorFlow: ``(fractions [N, 3], lung_pixels [N, 2])`` of maps and lung maps ``[N, S, S, 1]``.

    ``fractions`` are the patient's right, left and both lungs' infected fractions
    ``|map >= t and lung| / |lung|`` (0 where that lung has no pixel; ``lung_pixels`` tells),
    with the lungs split at the vertical midline (image-left half = patient's right lung).
    """
    import tensorflow as tf

    infected = tf.cast(maps >= threshold, tf.float32)[..., 0]
    lung = tf.cast(lungs >= lung_threshold, tf.float32)[..., 0]
    width = tf.shape(lung)[2]
    image_left = tf.cast(tf.range(width) < width // 2, tf.float32)[None, None, :]
    right, left = lung * image_left, lung * (1.0 - image_left)

    def counts(region):
        return tf.reduce_sum(region, axis=[1, 2]), tf.reduce_sum(region * infected, axis=[1, 2])

    (right_pixels, right_infected), (left_pixels, left_infected) = counts(right), counts(left)
    fractions = tf.stack([
        tf.math.divide_no_nan(right_infected, right_pixels),
        tf.math.divide_no_nan(left_infected, left_pixels),
        tf.math.divide_no_nan(right_infected + left_infected, right_pixels + left_pixels),
    ], axis=1)
    return fractions, tf.stack([right_pixels, left_pixels], axis=1)


def lung_infection_features(infection_maps: np.ndarray, lung_maps: np.ndarray, *,
                            threshold: float = 0.5, lung_threshold: float = LUNG_THRESHOLD) -> np.ndarray:
    """Per-image ``[right, left, total]`` infected lung fractions, float64 ``[N, 3]`` (NaN for a
    lung without pixels), from infection maps and lung masks/probabilities ``[N, H, W(, 1)]``.

    The feature for the severity regression (columns `FEATURE_NAMES`); lungs split with
    `caaxr_tf.infection.maps.split_lungs` (components, else the midline).
    """
    maps, lungs = _batch(infection_maps, "infection_maps"), _batch(lung_maps, "lung_maps")
    if maps.shape != lungs.shape:
        raise ValueError(f"infection maps {maps.shape} and lung maps {lungs.shape} differ in shape")
    features = np.empty((len(maps), 3), np.float64)
    for index, (infection_map, lung_map) in enumerate(zip(maps, lungs)):
        severity = lung_infection_fractions(infection_map, lung_map, threshold, lung_threshold)
        features[index] = severity.right_fraction, severity.left_fraction, severity.total_fraction
    return features


def image_infection_features(images: np.ndarray, infection_run: str | Path, lung_run: str | Path, *,
                             threshold: float = 0.5, batch_size: int = 16) -> np.ndarray:
    """``[N, 3]`` per-lung infected fractions of raw images (float ``[N, S, S, 1]`` 0..255 at the
    infection run's image size): both runs' best models, the map restricted to the lungs, then
    `lung_infection_features`. For feature extraction by other modules (severity)."""
    from caaxr_tf.models.outputs import predict_function
    from caaxr_tf.run_files import load_run_model
    from caaxr_tf.models.outputs import mask_output

    predict = predict_function(load_run_model(Path(infection_run), "best"))
    lungs = LungRun(lung_run)
    images = np.asarray(images, np.float32)
    features = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        maps = np.asarray(mask_output(predict(batch)), np.float32)
        features.append(lung_infection_features(maps, lungs.predict(batch), threshold=threshold))
    return np.concatenate(features) if features else np.zeros((0, 3))
