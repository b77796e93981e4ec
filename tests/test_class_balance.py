"""class_balance: loss weights and balanced sampling for imbalanced training splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from caaxr_tf import runs
from caaxr_tf import train as train_lib
from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.data.pipeline import balanced_repeats, read_summary
from caaxr_tf.tasks.datasets import make_dataset
from caaxr_tf.tasks.classification import ClassificationTask, balanced_class_weights

pytestmark = pytest.mark.numerics  # numerics: rerun with oneDNN off by `make test` (tolerances.py)

COVID_COUNT = 12  # of the tiny set's 40 COVID images: about 1 COVID to 4.5 non-COVID


@pytest.fixture(scope="module")
def imbalanced_root(tiny_data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imbalanced_tfrecords")
    tfr.build_tfrecords(tiny_data_root, out, protocols=["2class"], workers=1, progress=False, log=lambda line: None,
                        protocol_overrides=[f"caaxr.2class.classes.covid.count={COVID_COUNT}"])
    return out


def train_counts(protocol_dir: Path, fold: int = 1) -> list[int]:
    summary = read_summary(protocol_dir)
    return [summary["counts"][f"fold{fold}"]["train"][name] for name in summary["classes"]]


def test_balanced_class_weights_match_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    counts = [5, 21, 9]
    labels = np.repeat(np.arange(3), counts)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(balanced_class_weights(counts), expected, rtol=1e-12)
    # an absent class gets no weight and does not count among the classes
    np.testing.assert_allclose(balanced_class_weights([4, 0, 12]), [2.0, 0.0, 16 / 24])


def test_weighted_loss_equals_a_hand_computed_reference():
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 1, 2, 1, 0])
    targets = np.eye(3, dtype=np.float32)[labels]
    logits = rng.normal(size=(6, 3))
    probabilities = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    weights = np.array([2.5, 0.4, 1.7], np.float32)

    weighted = ClassificationTask(["a", "b", "c"], class_weights=weights.tolist())
    got = weighted.per_example_loss(tf.constant(targets), tf.constant(probabilities)).numpy()
    expected = -np.log(probabilities[np.arange(6), labels]) * weights[labels]
    np.testing.assert_allclose(got, expected, rtol=1e-5)  # elementwise float32 log against float64: ulps
    unweighted = ClassificationTask(["a", "b", "c"]).per_example_loss(tf.constant(targets),
                                                                      tf.constant(probabilities)).numpy()
    np.testing.assert_allclose(unweighted, -np.log(probabilities[np.arange(6), labels]), rtol=1e-5)


def class_frequencies(dataset, batches: int) -> np.ndarray:
    seen: Counter = Counter()
    for _, target in dataset.take(batches):
        seen.update(np.argmax(target.numpy(), axis=1).tolist())
    total = sum(seen.values())
    return np.array([seen[i] / total for i in range(len(seen))])


def test_balanced_sampling_gives_equal_class_frequencies(imbalanced_root):
    protocol_dir = imbalanced_root / "2class"
    counts = train_counts(protocol_dir)
    assert counts[0] * 3 < counts[1]  # clearly imbalanced to start with
    common = dict(fold=1, batch_size=10, image_size=32, training=True, augment=False, repeat=True,
                  drop_remainder=True, seed=0)

    plain = class_frequencies(make_dataset(protocol_dir, "train", **common), 60)
    np.testing.assert_allclose(plain, np.array(counts) / sum(counts), atol=0.03)  # what the split holds

    repeats = balanced_repeats(counts)
    balanced = class_frequencies(make_dataset(protocol_dir, "train", class_repeats=repeats, **common), 60)
    np.testing.assert_allclose(balanced, [0.5, 0.5], atol=0.05)


def test_each_image_is_repeated_by_its_class_factor(imbalanced_root):
    protocol_dir = imbalanced_root / "2class"
    counts = train_counts(protocol_dir)
    repeats = [2.5, 1.0]
    one_pass = make_dataset(protocol_dir, "train", batch_size=64, image_size=16, training=False, augment=False,
                            with_ids=True, class_repeats=repeats)
    per_image: Counter = Counter()
    labels: dict[str, int] = {}
    for _, target, ids in one_pass:
        for image_id, label in zip(ids.numpy(), np.argmax(target.numpy(), axis=1)):
            per_image[image_id] += 1
            labels[image_id] = int(label)
    assert len(per_image) == sum(counts)  # every training image is there
    assert {per_image[i] for i in per_image if labels[i] == 1} == {1}
    covid_copies = [per_image[i] for i in per_image if labels[i] == 0]
    assert set(covid_copies) <= {2, 3}
    assert abs(np.mean(covid_copies) - 2.5) <= 0.5


def test_balanced_sampling_keeps_file_level_auto_sharding(imbalanced_root):
    """Multi-worker training splits the shards between workers by file; balancing must not
    put a random source into the pipeline, which would make tf.data refuse that."""
    from tensorflow.python.data.experimental.ops.distribute import _AutoShardDataset

    protocol_dir = imbalanced_root / "2class"
    # cache off: the two in-process "workers" would share one in-memory cache (separate
    # processes do not), and the second would read the first one's records from it
    dataset = make_dataset(protocol_dir, "train", batch_size=4, image_size=16, training=True, augment=True,
                           with_ids=True, class_repeats=balanced_repeats(train_counts(protocol_dir)), cache=False)
    shards = []
    for index in range(2):
        ids = set()
        for _, _, batch_ids in _AutoShardDataset(dataset, 2, index):
            ids.update(batch_ids.numpy().tolist())
        shards.append(ids)
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == sum(train_counts(protocol_dir))


@pytest.mark.parametrize("balance", ["weights", "sampling"])
def test_training_with_class_balance_under_mirrored_strategy(imbalanced_root, tmp_path, balance, capsys):
    run_dir = tmp_path / balance
    args = train_lib.parse_args(
        ["--protocol", "2class", "--model", "resnet18", "--tfrecords", str(imbalanced_root), "--out", str(run_dir),
         "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--class-balance", balance,
         "--set", "image_size=32", "--quiet"]
    )
    config = train_lib.resolve_config(args)
    strategy = train_lib.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    train_lib.prepare_run_dir(run_dir, config, True)
    result = train_lib.train(config, run_dir, strategy, verbose=False)
    assert np.isfinite(result.history[-1]["loss"])
    assert runs.load_run_config(run_dir)["class_balance"] == balance
    counts = train_counts(imbalanced_root / "2class")
    printed = capsys.readouterr().out
    assert f"class_balance {balance}: training images per class covid {counts[0]}, non_covid {counts[1]}" in printed


def test_class_balance_is_refused_for_segmentation_and_unknown_values(tiny_data_root, tmp_path):
    out = tmp_path / "tfr"
    tfr.build_tfrecords(tiny_data_root, out, protocols=["seg"], workers=1, progress=False, log=lambda line: None)
    args = train_lib.parse_args(["--protocol", "seg", "--model", "unet", "--tfrecords", str(out), "--out",
                                 str(tmp_path / "run"), "--class-balance", "weights"])
    with pytest.raises(train_lib.ConfigError, match="class_balance 'weights' applies to classifiers"):
        train_lib.resolve_config(args)
    args = train_lib.parse_args(["--protocol", "seg", "--model", "unet", "--tfrecords", str(out), "--out",
                                 str(tmp_path / "run"), "--set", "class_balance=oversample"])
    with pytest.raises(train_lib.ConfigError, match="class_balance must be one of none, weights, sampling, got 'oversample'"):
        train_lib.resolve_config(args)


def test_sampling_through_the_trainers_training_datasets_balances_the_classes(imbalanced_root, tmp_path):
    """``class_balance: sampling`` as the trainer builds its input (``training_datasets``), not only
    the pipeline helper: over 100 batches both classes are about equally frequent."""
    from caaxr_tf.tasks import get_task
    from caaxr_tf.training.trainer import training_datasets

    args = train_lib.parse_args(
        ["--protocol", "2class", "--model", "resnet18", "--tfrecords", str(imbalanced_root), "--out",
         str(tmp_path / "run"), "--batch-size", "8", "--class-balance", "sampling", "--set", "image_size=16",
         "--quiet"])
    config = train_lib.resolve_config(args)
    counts = config.training_class_counts()
    assert counts == [4, 21]  # covid, non_covid: 4 COVID images in fold 1's training split
    repeats = balanced_repeats(counts)
    assert repeats == [21 / 4, 1.0]
    data = training_datasets(config, get_task(config.task).from_config(config), 8)
    assert data.steps == (4 * 21 // 4 + 21) // 8  # an epoch is one oversampled pass: 42 images
    batches = 100
    labels = np.concatenate([np.argmax(target.numpy(), axis=1) for _, target in data.train.take(batches)])
    assert labels.size == batches * 8
    covid_share = float(np.mean(labels == 0))
    # Tolerance 0.06: one pass holds 21 non-COVID images and 5 or 6 copies of each of the 4 COVID
    # images (the image-id hash decides which get the 6th), so a whole pass's COVID share lies in
    # 20/41..24/45 = 0.488..0.534; the last, partial pass (< 45 of the 800 images) can move the
    # share by at most 45/800 = 0.056 more. Without the repeats the share is 4/25 = 0.16.
    assert abs(covid_share - 0.5) <= 0.06, covid_share


@pytest.mark.parametrize("factor, whole, extra_share", [(2.5, 2, 0.5), (3.25, 3, 0.25)])
def test_fractional_repeats_give_floor_and_ceil_copies_in_the_right_proportion(factor, whole, extra_share):
    """A factor of 2.5 gives 2 or 3 copies (half the images each), never all 2; 3.25 gives 3 or 4."""
    from caaxr_tf.data.pipeline import repeat_by_class

    n = 4000
    ids = [f"image{i:05d}" for i in range(n)]
    labels = np.arange(n) % 2  # class 0 repeated by `factor`, class 1 once
    records = tf.data.Dataset.from_tensor_slices({"id": ids, "label": labels.astype(np.int64)})
    copies: Counter = Counter(
        record["id"].numpy() for record in repeat_by_class(records, [factor, 1.0]))
    repeated = np.array([copies[i.encode()] for i, label in zip(ids, labels) if label == 0])
    once = np.array([copies[i.encode()] for i, label in zip(ids, labels) if label == 1])
    assert set(once.tolist()) == {1}
    assert set(repeated.tolist()) == {whole, whole + 1}
    # Tolerance 0.03: which images get the extra copy is a hash of the id, about uniform; over 2000
    # images the share of extra copies has a standard deviation of at most sqrt(0.25 / 2000) = 0.011.
    assert abs(np.mean(repeated == whole + 1) - extra_share) <= 0.03
    assert abs(repeated.mean() - factor) <= 0.03
