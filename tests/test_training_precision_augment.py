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


def assert_same_adam_step(after: list[np.ndarray], expected: list[np.ndarray], learning_rate: float) -> None:
    """Weights after one Adam step from the same start, computed through two traces. Adam's first
    step is lr · g / (|g| + ε): for a weight whose gradient is within a few ε of zero, a kernel-level
    change of g (the replicas' all-reduce adds in another order) moves the step by a visible fraction
    of lr, so 5 % of lr is the bound; a different transform moves many steps by up to 2 lr."""
    for a, b in zip(after, expected):
        np.testing.assert_allclose(a, b, rtol=KERNEL_RTOL, atol=0.05 * learning_rate)


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

    flags = ["--protocol", "seg", "--model", "unet", "--batch-size", "4", *UNET_SMALL, *SMALL]
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

    loss_in_step, weights_in_step = one_step_loss(step_trainer, first)
    # By hand: the same batch augmented with the step's seed (run seed, step 0 x 1 replica + replica 0),
    # through the step of the run without augmentation, from the same initial weights.
    images, masks = augment_batch(first[0], first[1], np.array([in_step.seed, 0], np.int64))
    by_hand = built_trainer(plain, tmp_path / "h")
    loss_by_hand, weights_by_hand = one_step_loss(by_hand, (images, masks))
    _, weights_plain = one_step_loss(built_trainer(plain, tmp_path / "n"), first)
    # same graph and kernels on both sides; KERNEL_RTOL because the two steps are separate traces
    assert loss_in_step == pytest.approx(loss_by_hand, rel=KERNEL_RTOL)
    assert_same_adam_step(weights_in_step, weights_by_hand, in_step.optimizer.learning_rate)
    # the step did augment: the unaugmented step moves the weights elsewhere (Adam's first step is
    # about the learning rate per weight, up to twice that where the sign of a gradient flips)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(weights_in_step, weights_plain))
    assert moved > in_step.optimizer.learning_rate


@pytest.mark.numerics  # compares two traced steps at KERNEL_RTOL
def test_each_replica_draws_its_own_transforms(tfrecords_root, tmp_path):
    import keras

    flags = ["--protocol", "seg", "--model", "unet", "--batch-size", "4", "--strategy", "mirrored", *UNET_SMALL, *SMALL]
    in_step = resolve(tfrecords_root, tmp_path / "s", *flags, "--augment-in", "step")
    plain = resolve(tfrecords_root, tmp_path / "p", *flags, "--set", "augment=false")
    keras.utils.set_random_seed(0)
    step_trainer = built_trainer(in_step, tmp_path / "s", "mirrored")
    assert step_trainer.num_replicas == 2
    images, masks = (t.numpy() for t in next(iter(step_trainer.train_dataset)))
    loss_in_step, weights_in_step = one_step_loss(step_trainer, (images, masks))
    # By hand: replica r holds images [2r, 2r + 2) of the global batch and draws with seed
    # (run seed, step 0 x 2 replicas + r); then the unaugmented run's step on the result.
    halves = [augment_batch(images[2 * r:2 * r + 2], masks[2 * r:2 * r + 2], np.array([in_step.seed, r], np.int64))
              for r in (0, 1)]
    by_hand = (np.concatenate([h[0].numpy() for h in halves]), np.concatenate([h[1].numpy() for h in halves]))
    loss_by_hand, weights_by_hand = one_step_loss(built_trainer(plain, tmp_path / "h", "mirrored"), by_hand)
    assert loss_in_step == pytest.approx(loss_by_hand, rel=KERNEL_RTOL)
    assert_same_adam_step(weights_in_step, weights_by_hand, in_step.optimizer.learning_rate)


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
