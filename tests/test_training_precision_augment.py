"""Training in mixed bfloat16 (``mixed_precision: bfloat16``) and augmentation inside the
training step (``augment_in: step``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tolerances import KERNEL_RTOL

from caaxr_tf import runs
from caaxr_tf import train as train_lib
from caaxr_tf.config import ConfigError
from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.data.pipeline import augment_batch, make_dataset
from caaxr_tf.models.precision import OVERRIDE_VARIABLE
from caaxr_tf.training.config import OptimizerConfig, mixed_policy, needs_loss_scaling

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set", "image_size=64", "--quiet"]
UNET_SMALL = ["--set", "model_kwargs.base_filters=8"]


@pytest.fixture(scope="module")
def tfrecords_root(tiny_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("precision_augment_tfrecords")
    tfr.build_tfrecords(tiny_data_root, out, protocols=["seg", "2class"], workers=1, progress=False, log=lambda line: None)
    return out


def resolve(tfrecords_root: Path, out: Path, *flags: str):
    return train_lib.resolve_config(train_lib.parse_args(
        ["--tfrecords", str(tfrecords_root), "--out", str(out), *flags]))


# ------------------------------------------------------------------ mixed bfloat16


def test_mixed_precision_settings_and_their_loss_scaling(tfrecords_root, tmp_path):
    import keras

    seg = ["--protocol", "seg", "--model", "unet"]
    assert resolve(tfrecords_root, tmp_path / "a", *seg, "--mixed-precision").mixed_precision is True
    assert resolve(tfrecords_root, tmp_path / "b", *seg, "--mixed-precision", "bfloat16").mixed_precision == "bfloat16"
    assert resolve(tfrecords_root, tmp_path / "c", *seg).mixed_precision is False
    with pytest.raises(SystemExit):
        train_lib.parse_args(["--protocol", "seg", "--model", "unet", "--mixed-precision", "bf16"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        resolve(tfrecords_root, tmp_path / "d", *seg, "--set", "mixed_precision=bf16")
    # true keeps its old meaning (float16); only float16 scales the loss
    assert [mixed_policy(s) for s in (False, True, "float16", "bfloat16")] == [
        None, "mixed_float16", "mixed_float16", "mixed_bfloat16"]
    assert [needs_loss_scaling(s) for s in (False, True, "float16", "bfloat16")] == [False, True, True, False]
    optimizer = OptimizerConfig(name="adam", learning_rate=1e-3)
    assert not isinstance(optimizer.build(loss_scaling=needs_loss_scaling("bfloat16")), keras.optimizers.LossScaleOptimizer)
    assert isinstance(optimizer.build(loss_scaling=needs_loss_scaling(True)), keras.optimizers.LossScaleOptimizer)


def test_bfloat16_training_is_refused_where_the_cpu_lacks_it_and_leaves_nothing(tfrecords_root, tmp_path, monkeypatch):
    monkeypatch.setenv(OVERRIDE_VARIABLE, "float32")  # a CPU without avx512_bf16/amx_bf16
    out = tmp_path / "refused"
    config = resolve(tfrecords_root, out, "--protocol", "2class", "--model", "resnet18", "--mixed-precision",
                     "bfloat16", *SMALL)
    with pytest.raises(ConfigError, match="mixed_precision: bfloat16 needs a CPU with avx512_bf16 or amx_bf16"):
        train_lib.run_training(config, out, verbose=False)
    assert not out.exists()


def test_a_bfloat16_run_trains_in_a_fresh_process_with_float32_variables(tfrecords_root, tmp_path):
    import keras

    from test_train import layer_dtype_policies

    out = tmp_path / "bf16"
    # The override runs bfloat16 on any CPU (emulated where the CPU lacks it: slow, same numbers).
    code = subprocess.run(
        [sys.executable, "-m", "caaxr_tf.train", "--protocol", "2class", "--model", "resnet18", "--tfrecords",
         str(tfrecords_root), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
         "--mixed-precision", "bfloat16", *SMALL],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, **{OVERRIDE_VARIABLE: "float32,bfloat16"}))
    assert code.returncode == 0, code.stderr[-3000:]
    assert runs.load_run_config(out)["mixed_precision"] == "bfloat16"
    policies = layer_dtype_policies(out / runs.FINAL_MODEL)
    assert {name for name, policy in policies.items() if policy != "mixed_bfloat16"} == {"image", "input", "predictions"}
    assert policies["predictions"] == "float32" and len(policies) > 50
    model = keras.saving.load_model(out / runs.FINAL_MODEL, compile=False)
    assert {v.dtype for v in model.weights} == {"float32"}
    assert np.isfinite(model.predict(np.zeros((1, 64, 64, 1), np.float32), verbose=0)).all()


# ------------------------------------------------------------------ augmentation in the step


def built_trainer(config, run_dir: Path, strategy: str = "one"):
    from caaxr_tf.training import Trainer, make_strategy

    return Trainer(config, run_dir, make_strategy(strategy), verbose=False, callbacks=[]).build()


# Plain SGD at learning rate 1 makes one step's weight change the gradient itself. (With Adam, the
# first step is lr * g / (|g| + eps): a weight whose gradient is within a few eps of zero moves by
# any fraction of lr when a kernel changes g in its last bits, so no tolerance on Adam weights holds
# on every CPU; with oneDNN off one weight of 576 moved by lr.)
SGD_STEP = ["--set", "optimizer={name: sgd, learning_rate: 1.0}"]


# The gradient of one step, compared over all weights as ||g - g_ref|| / ||g_ref||. Not element-wise:
# the UNet's early kernels get their gradient through batch normalisation, whose backward pass
# subtracts nearly equal sums, so a kernel-level (KERNEL_RTOL) change of those sums is a large part
# of a small element. Measured between the two traces: 8e-6 to 1.8e-5 with oneDNN, 5.9e-4 to 7.7e-4
# without; a wrong transform (the next seed, replica 0's seed on both replicas, no augmentation)
# is 0.22 to 0.27 away, with oneDNN on and off alike.
GRADIENT_RTOL = 1e-2


def step_gradients(before: list[np.ndarray], after: list[np.ndarray]) -> list[np.ndarray]:
    return [b.astype(np.float64) - a.astype(np.float64) for b, a in zip(before, after)]


def gradient_distance(before: list[np.ndarray], after: list[np.ndarray], expected_after: list[np.ndarray]) -> float:
    """||g - g_expected|| / ||g_expected|| over all trainable weights, for one SGD step each."""
    got = np.concatenate([g.ravel() for g in step_gradients(before, after)])
    expected = np.concatenate([g.ravel() for g in step_gradients(before, expected_after)])
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def assert_same_gradients(before: list[np.ndarray], after: list[np.ndarray], expected_after: list[np.ndarray]) -> None:
    distance = gradient_distance(before, after, expected_after)
    assert distance <= GRADIENT_RTOL, distance


def initial_weights(trainer) -> list[np.ndarray]:
    return [w.numpy() for w in trainer.model.trainable_weights]


def one_step_loss(trainer, batch) -> tuple[float, list[np.ndarray]]:
    """The trainer's own step on ``batch``: the loss it tracked and the weights after it."""
    import tensorflow as tf

    held = tf.data.Dataset.from_tensors(batch).repeat()
    iterator = iter(trainer.strategy.experimental_distribute_dataset(held))
    trainer.train_step(iterator)
    return float(trainer.loss_tracker.result()), [w.numpy() for w in trainer.model.trainable_weights]


@pytest.mark.numerics  # compares two traced steps at KERNEL_RTOL
def test_step_augmentation_is_the_pipelines_augmentation_moved_into_the_step(tfrecords_root, tmp_path):
    import keras

    flags = ["--protocol", "seg", "--model", "unet", "--batch-size", "4", *UNET_SMALL, *SMALL, *SGD_STEP]
    in_step = resolve(tfrecords_root, tmp_path / "s", *flags, "--augment-in", "step")
    plain = resolve(tfrecords_root, tmp_path / "p", *flags, "--set", "augment=false")
    in_pipeline = resolve(tfrecords_root, tmp_path / "q", *flags)

    keras.utils.set_random_seed(0)
    step_trainer = built_trainer(in_step, tmp_path / "s")
    first = next(iter(step_trainer.train_dataset))
    # the pipeline delivers plain batches: the ones of an unaugmented run, not those of the default
    unaugmented = next(iter(built_trainer(plain, tmp_path / "p").train_dataset))
    np.testing.assert_array_equal(first[0].numpy(), unaugmented[0].numpy())
    np.testing.assert_array_equal(first[1].numpy(), unaugmented[1].numpy())
    augmented_by_pipeline = next(iter(built_trainer(in_pipeline, tmp_path / "q").train_dataset))
    assert not np.array_equal(first[0].numpy(), augmented_by_pipeline[0].numpy())

    start = initial_weights(step_trainer)
    loss_in_step, weights_in_step = one_step_loss(step_trainer, first)
    # By hand: the same batch augmented with the step's seed (run seed, step 0 x 1 replica + replica 0),
    # through the step of the run without augmentation, from the same initial weights.
    images, masks = augment_batch(first[0], first[1], np.array([in_step.seed, 0], np.int64))
    by_hand = built_trainer(plain, tmp_path / "h")
    assert all(np.array_equal(a, b) for a, b in zip(initial_weights(by_hand), start))
    loss_by_hand, weights_by_hand = one_step_loss(by_hand, (images, masks))
    _, weights_plain = one_step_loss(built_trainer(plain, tmp_path / "n"), first)
    # same graph and kernels on both sides; KERNEL_RTOL because the two steps are separate traces
    assert loss_in_step == pytest.approx(loss_by_hand, rel=KERNEL_RTOL)
    assert_same_gradients(start, weights_in_step, weights_by_hand)
    # the seed matters: the next seed's transforms give another step
    other = augment_batch(first[0], first[1], np.array([in_step.seed, 1], np.int64))
    _, weights_other = one_step_loss(built_trainer(plain, tmp_path / "o"), other)
    assert gradient_distance(start, weights_other, weights_in_step) > 10 * GRADIENT_RTOL
    # the step did augment: the unaugmented step's gradient is far outside the tolerance
    assert gradient_distance(start, weights_plain, weights_in_step) > 10 * GRADIENT_RTOL


def augmented_by_halves(images: np.ndarray, masks: np.ndarray, seed: int,
                        draws: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Half r of the batch (replica r's share) augmented with seed (seed, draws[r])."""
    half = len(images) // 2
    parts = [augment_batch(images[r * half:(r + 1) * half], masks[r * half:(r + 1) * half],
                           np.array([seed, draw], np.int64)) for r, draw in enumerate(draws)]
    return np.concatenate([p[0].numpy() for p in parts]), np.concatenate([p[1].numpy() for p in parts])


@pytest.mark.numerics  # compares two traced steps at KERNEL_RTOL
def test_each_replica_draws_its_own_transforms(tfrecords_root, tmp_path):
    import keras

    flags = ["--protocol", "seg", "--model", "unet", "--batch-size", "4", "--strategy", "mirrored", *UNET_SMALL, *SMALL,
             *SGD_STEP]
    in_step = resolve(tfrecords_root, tmp_path / "s", *flags, "--augment-in", "step")
    plain = resolve(tfrecords_root, tmp_path / "p", *flags, "--set", "augment=false")
    keras.utils.set_random_seed(0)
    step_trainer = built_trainer(in_step, tmp_path / "s", "mirrored")
    assert step_trainer.num_replicas == 2
    images, masks = (t.numpy() for t in next(iter(step_trainer.train_dataset)))
    start = initial_weights(step_trainer)
    loss_in_step, weights_in_step = one_step_loss(step_trainer, (images, masks))
    # By hand: replica r holds images [2r, 2r + 2) of the global batch and draws with seed
    # (run seed, step 0 x 2 replicas + r); then the unaugmented run's step on the result.
    by_hand = augmented_by_halves(images, masks, in_step.seed, draws=(0, 1))
    by_hand_trainer = built_trainer(plain, tmp_path / "h", "mirrored")
    assert all(np.array_equal(a, b) for a, b in zip(initial_weights(by_hand_trainer), start))
    loss_by_hand, weights_by_hand = one_step_loss(by_hand_trainer, by_hand)
    assert loss_in_step == pytest.approx(loss_by_hand, rel=KERNEL_RTOL)
    assert_same_gradients(start, weights_in_step, weights_by_hand)
    # the replica term matters: both replicas drawing with replica 0's seed give another step
    same_seed = augmented_by_halves(images, masks, in_step.seed, draws=(0, 0))
    _, weights_same_seed = one_step_loss(built_trainer(plain, tmp_path / "o", "mirrored"), same_seed)
    assert gradient_distance(start, weights_same_seed, weights_in_step) > 10 * GRADIENT_RTOL


def test_masks_follow_the_images_in_the_step_for_segmentation_and_infection():
    import tensorflow as tf

    from caaxr_tf.tasks.infection import InfectionTask
    from caaxr_tf.tasks.segmentation import SegmentationTask

    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (3, 32, 32, 1)), tf.float32)
    masks = tf.constant((rng.uniform(size=(3, 32, 32, 1)) > 0.5).astype(np.float32))
    seed = tf.constant([5, 9], tf.int64)
    expected_images, expected_masks = augment_batch(images, masks, seed)
    assert not np.array_equal(expected_masks.numpy(), masks.numpy())

    seg = SegmentationTask.__new__(SegmentationTask)
    got_images, got_masks = seg.augment_in_step(images, masks, seed)
    np.testing.assert_array_equal(got_images.numpy(), expected_images.numpy())
    np.testing.assert_array_equal(got_masks.numpy(), expected_masks.numpy())

    covid = tf.constant([1.0, 0.0, 1.0])
    infection = InfectionTask.__new__(InfectionTask)
    got_images, targets = infection.augment_in_step(images, {"mask": masks, "covid": covid}, seed)
    np.testing.assert_array_equal(got_images.numpy(), expected_images.numpy())
    np.testing.assert_array_equal(targets["mask"].numpy(), expected_masks.numpy())
    np.testing.assert_array_equal(targets["covid"].numpy(), covid.numpy())


def test_step_augmentation_gives_the_same_weights_in_two_processes(tfrecords_root, tmp_path):
    import keras

    def train(name: str) -> list[np.ndarray]:
        out = tmp_path / name
        code = subprocess.run(
            [sys.executable, "-m", "caaxr_tf.train", "--protocol", "seg", "--model", "unet", "--tfrecords",
             str(tfrecords_root), "--out", str(out), "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "4",
             "--augment-in", "step", *UNET_SMALL, *SMALL],
            capture_output=True, text=True, cwd=REPO)
        assert code.returncode == 0, code.stderr[-3000:]
        return keras.saving.load_model(out / runs.FINAL_MODEL, compile=False).get_weights()

    first, second = train("one"), train("two")
    assert len(first) == len(second) > 10
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
