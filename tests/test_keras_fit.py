"""`safetrain.fit` end to end: the numbers of Keras's `model.fit` and
`model.evaluate` on the same data and seed (with clipping off), resume by
calling again, the guard and recovery of a Trainer run, and class_weight for
Trainer users (`config.class_weight`).

Every comparison trains the same architecture from the same initial weights
(`keras.utils.set_random_seed` before the model is built) on the same
batches: once with Keras's `fit`, once with `safetrain.fit`.
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from common import tiny_config

import safetrain
from safetrain import keras_fit
from safetrain.cli import main as cli

TOL = dict(rtol=1e-5, atol=1e-6)


def keras_config(**overrides):
  """safetrain's defaults with clipping off: Keras's numbers."""
  config = safetrain.default_config()
  config.clip.global_norm = 0.0
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def same_weights(a, b, atol=1e-6):
  for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=atol)


def same_history(keras_history, ours):
  assert set(ours) == set(keras_history), (sorted(ours), sorted(keras_history))
  for name, values in keras_history.items():
    np.testing.assert_allclose(ours[name], values, **TOL, err_msg=name)


def records(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------ the models


def regressor():
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
    [
      keras.Input((4,)),
      keras.layers.Dense(8, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3)),
      keras.layers.Dense(1),
    ]
  )
  model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])
  return model


def regression_data(n=100, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype("float32")
  return x, (x.sum(axis=1, keepdims=True) + 0.1).astype("float32")


def classifier():
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
    [
      keras.Input((5,)),
      keras.layers.Dense(16, activation="relu"),
      keras.layers.Dense(3, activation="softmax"),
    ]
  )
  return model


def classification_data(n=90, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)).astype("float32")
  y = (x[:, 0] + 0.3 * x[:, 1] > 0.5).astype("int32") + (x[:, 2] > 1).astype("int32")
  return x, y


def two_headed():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,), name="inputs")
  hidden = keras.layers.Dense(8, activation="tanh")(inputs)
  outputs = {
    "reg": keras.layers.Dense(1, name="reg")(hidden),
    "cls": keras.layers.Dense(1, activation="sigmoid", name="cls")(hidden),
  }
  model = keras.Model(inputs, outputs)
  model.compile(
    optimizer=keras.optimizers.SGD(0.1),
    loss={"reg": "mse", "cls": "binary_crossentropy"},
    loss_weights={"reg": 0.5, "cls": 2.0},
    metrics={"reg": ["mae"], "cls": ["accuracy"]},
  )
  return model


# ----------------------------------------------------- parity with Keras


def test_regression_on_arrays_matches_keras_and_resumes_by_calling_again(tmp_path):
  """100 rows in batches of 16 (a partial last batch), an L2 regularizer,
  validation every second epoch; safetrain.fit called twice on the same
  workdir (2 epochs, then 4, on a fresh model) ends where one Keras fit of
  4 epochs ends, with Keras's history and evaluate()."""
  x, y = regression_data()
  xv, yv = regression_data(30, seed=5)
  args = dict(batch_size=16, shuffle=False, validation_data=(xv, yv), validation_freq=2)
  reference = regressor()
  history = reference.fit(x, y, epochs=4, verbose=0, **args).history
  evaluated = reference.evaluate(xv, yv, verbose=0, return_dict=True)

  workdir = str(tmp_path / "run")
  first = safetrain.fit(regressor(), x, y, epochs=2, workdir=workdir, config=keras_config(), **args)
  assert first.step == 14 and first.steps_per_epoch == 7
  model = regressor()
  result = safetrain.fit(model, x, y, epochs=4, workdir=workdir, config=keras_config(), **args)

  assert isinstance(result, safetrain.FitResult) and result.step == 28
  same_weights(reference, model)
  same_history(history, result.history)
  assert set(result.eval_metrics) == set(evaluated) | {"examples"}
  for name, value in evaluated.items():
    np.testing.assert_allclose(result.eval_metrics[name], value, **TOL)
  assert result.eval_metrics["examples"] == 30
  # The second call resumed from the first one's checkpoint at step 14.
  resumed = json.load(open(os.path.join(workdir, "config.json")))["resumed_from"]
  assert resumed and resumed.endswith("ckpt-14")
  assert os.path.isfile(os.path.join(workdir, "export", "model.keras"))


@pytest.mark.parametrize("source", ["arrays_one_hot", "dataset_sparse"])
def test_classification_with_class_weight_matches_keras(tmp_path, source):
  """class_weight turned into sample weights as Keras does, for one-hot
  labels in arrays (argmax) and sparse labels in a dataset (rounded); the
  training and validation loss, accuracy and top-2 accuracy, and the
  weights, as Keras's."""
  x, y = classification_data()
  xv, yv = classification_data(25, seed=7)
  weights = {0: 1.0, 1: 3.0, 2: 7.5}
  one_hot = source == "arrays_one_hot"
  loss = "categorical_crossentropy" if one_hot else "sparse_categorical_crossentropy"
  top2 = (
    keras.metrics.TopKCategoricalAccuracy
    if one_hot
    else keras.metrics.SparseTopKCategoricalAccuracy
  )

  def compiled():
    model = classifier()
    model.compile(keras.optimizers.Adam(0.01), loss=loss, metrics=["accuracy", top2(k=2)])
    return model

  if one_hot:
    y, yv = np.eye(3, dtype="float32")[y], np.eye(3, dtype="float32")[yv]
    data = dict(x=x, y=y, batch_size=20, shuffle=False, validation_data=(xv, yv))
  else:
    data = dict(
      x=tf.data.Dataset.from_tensor_slices((x, y)).batch(20),
      validation_data=tf.data.Dataset.from_tensor_slices((xv, yv)).batch(10),
    )
  reference = compiled()
  history = reference.fit(epochs=2, class_weight=weights, verbose=0, **data).history
  model = compiled()
  result = safetrain.fit(
    model, epochs=2, class_weight=weights, workdir=str(tmp_path), config=keras_config(), **data
  )
  same_weights(reference, model)
  same_history(history, result.history)
  unweighted = compiled()
  unweighted.fit(epochs=2, verbose=0, **data)
  assert not np.allclose(unweighted.get_weights()[0], model.get_weights()[0])


def test_multi_output_with_a_dict_of_losses_on_a_dataset_matches_keras(tmp_path):
  """Two heads, a dict of losses with loss_weights, per-output metrics, a
  dataset with a partial validation batch: the total and per-output losses
  and metrics, trained and validated, as Keras reports them."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(64, 4)).astype("float32")
  y = {"reg": x.sum(axis=1, keepdims=True), "cls": (x[:, :1] > 0).astype("float32")}
  train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
  val = tf.data.Dataset.from_tensor_slices((x[:20], {k: v[:20] for k, v in y.items()})).batch(8)
  reference = two_headed()
  history = reference.fit(train, epochs=3, validation_data=val, verbose=0).history
  evaluated = reference.evaluate(val, verbose=0, return_dict=True)
  model = two_headed()
  result = safetrain.fit(
    model, train, epochs=3, validation_data=val, workdir=str(tmp_path), config=keras_config()
  )
  same_weights(reference, model)
  same_history(history, result.history)
  assert {"reg_loss", "cls_loss", "reg_mae", "cls_accuracy"} <= set(result.history)
  for name, value in evaluated.items():
    np.testing.assert_allclose(result.eval_metrics[name], value, **TOL)


def test_a_model_compiled_without_loss_and_optimizer_takes_them_from_config(tmp_path):
  """An uncompiled model trains with config.loss and config.optimizer: the
  same weights as Keras compiled with that loss and optimizer."""
  x, y = regression_data()

  def plain():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])

  reference = plain()
  reference.compile(keras.optimizers.SGD(0.02), loss="mae")
  reference.fit(x, y, batch_size=25, epochs=2, shuffle=False, verbose=0)
  config = keras_config(**{"loss": "mae", "optimizer.name": "sgd"})
  config.optimizer.learning_rate = 0.02
  model = plain()
  result = safetrain.fit(
    model, x, y, batch_size=25, epochs=2, shuffle=False, workdir=str(tmp_path), config=config
  )
  assert result.step == 8 and result.history == {}
  same_weights(reference, model)


# ------------------------------------------------------- data and epochs


def test_shuffle_draws_a_new_order_every_epoch_from_the_seed():
  """shuffle=True: every epoch is each row once, in a new order; the same
  seed gives the same orders. "batch": batches keep their rows, shuffled
  within. False: Keras's order, with the partial last batch."""
  rows = np.arange(10, dtype="float32")[:, None]

  def epochs(shuffle, seed=0, n=3):
    data = keras_fit._data(
      rows, rows, None, batch_size=4, steps=None, shuffle=shuffle, seed=seed, what="x"
    )
    batches = [b[0][:, 0].numpy().astype(int).tolist() for b in data.dataset().take(3 * n)]
    return [sum(batches[3 * e : 3 * e + 3], []) for e in range(n)], batches

  orders, _ = epochs(True)
  assert all(sorted(order) == list(range(10)) for order in orders)
  assert len({tuple(order) for order in orders}) == 3
  assert epochs(True)[0] == orders and epochs(True, seed=1)[0] != orders
  _, batches = epochs("batch")
  assert [sorted(b) for b in batches[:3]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert batches[:3] != [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert epochs(False)[1][:4] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


def test_a_shuffled_run_resumed_by_a_second_call_is_bit_identical(tmp_path):
  """The shuffled pipeline is stateless, so its iterator is in the
  checkpoint: 1 epoch then 3 equals 3 at once, bit for bit."""
  x, y = regression_data(40)
  args = dict(batch_size=8, shuffle=True, config=keras_config())
  once = regressor()
  safetrain.fit(once, x, y, epochs=3, workdir=str(tmp_path / "once"), **args)
  safetrain.fit(regressor(), x, y, epochs=1, workdir=str(tmp_path / "twice"), **args)
  twice = regressor()
  result = safetrain.fit(twice, x, y, epochs=3, workdir=str(tmp_path / "twice"), **args)
  assert result.step == 15
  for a, b in zip(once.get_weights(), twice.get_weights(), strict=True):
    np.testing.assert_array_equal(a, b)


def test_epochs_steps_and_steps_per_epoch_map_onto_train_steps_and_evaluation(tmp_path):
  """steps_per_epoch makes the epoch (its evaluations every 3 steps, which
  Keras callbacks see as the epochs' ends, with val_ logs); steps, instead
  of epochs, the total."""
  x, y = regression_data(40)
  ends = []
  seen = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append((epoch, logs)))
  result = safetrain.fit(
    regressor(),
    x,
    y,
    batch_size=4,
    steps_per_epoch=3,
    steps=7,
    validation_data=(x[:8], y[:8]),
    callbacks=[seen],
    workdir=str(tmp_path),
    config=keras_config(),
  )
  assert result.step == 7 and result.steps_per_epoch == 3
  assert [epoch for epoch, _ in ends] == [0, 1, 2]
  assert all("val_loss" in logs and "val_mae" in logs for _, logs in ends)
  evaluated = [r["step"] for r in records(str(tmp_path), "metrics.jsonl") if "eval_loss" in r]
  assert evaluated == [3, 6, 7]
  assert len(result.history["loss"]) == 2 and len(result.history["val_loss"]) == 2
  config = json.load(open(os.path.join(str(tmp_path), "config.json")))["config"]
  assert config["train"]["steps"] == 7 and config["eval"]["every_steps"] == 3


def test_an_epoch_is_one_pass_of_the_data_as_keras_counts_it():
  """A dataset of unknown length is counted; steps_per_epoch beyond the data
  is cut to one pass (Keras ends such an epoch when the data runs out); an
  infinite dataset needs steps_per_epoch."""
  x, y = regression_data(40)
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: a[0] > -10.0).batch(8)
  assert int(dataset.cardinality()) == tf.data.UNKNOWN_CARDINALITY
  unknown = keras_fit._dataset_data(dataset, "x")
  assert keras_fit._steps_per_epoch(unknown, None) == 5
  assert keras_fit._steps_per_epoch(unknown, 3) == 3
  arrays = keras_fit._data(x, y, None, batch_size=16, steps=None, shuffle=False, seed=0, what="x")
  assert arrays.batches == 3 and keras_fit._steps_per_epoch(arrays, 9) == 3
  by_steps = keras_fit._data(x, y, None, batch_size=None, steps=4, shuffle=False, seed=0, what="x")
  assert by_steps.batch_size == 10  # Keras: ceil(rows / steps_per_epoch)
  infinite = keras_fit._dataset_data(dataset.repeat(), "x")
  assert keras_fit._steps_per_epoch(infinite, 7) == 7
  with pytest.raises(ValueError, match="infinite"):
    keras_fit._steps_per_epoch(infinite, None)


# ------------------------------------------------- guard and recovery


def trainer_twin(model_fn, x, y, batch_size):
  """A Trainer subclass on the same model and batches as safetrain.fit."""

  class Twin(safetrain.Trainer):
    def build_model(self):
      return model_fn()

    def build_train_dataset(self):
      return keras_fit._array_dataset(
        (x, y), len(x), batch_size, shuffle=False, seed=0, passes=None
      )

  return Twin


def test_a_drilled_nan_gives_the_incidents_and_rollback_of_a_trainer_run(tmp_path):
  """A NaN loss on attempts 4-6 (config.drill): safetrain.fit skips them,
  rolls back and lowers the learning rate exactly as a Trainer subclass on
  the same model and batches does, and ends with the same weights."""
  x, y = regression_data(64)
  drill = {"drill.loss_steps": "4-6", "train.steps_per_loop": 4, "guard.preflight": "off"}

  def uncompiled():
    model = regressor()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model

  model = uncompiled()
  fitted = safetrain.fit(
    model,
    x,
    y,
    batch_size=16,
    shuffle=False,
    epochs=4,
    workdir=str(tmp_path / "fit"),
    config=keras_config(**drill),
  )
  config = keras_config(**drill, **{"optimizer.name": "sgd", "loss": "mse"})
  config.optimizer.learning_rate = 0.05
  config.train.steps, config.train.batch_size = 16, 16
  config.eval.every_steps = 4
  twin = trainer_twin(regressor, x, y, 16)(config, str(tmp_path / "trainer"))
  trained = twin.fit()

  def decisions(result):
    keys = ("step", "kind", "action", "restored_step", "lr_scale_before", "lr_scale_after")
    return [{k: r.get(k) for k in keys} for r in result.incidents]

  assert fitted.rollbacks == trained.rollbacks == 1
  assert decisions(fitted) == decisions(trained)
  assert [d["action"] for d in decisions(fitted)] == ["skipped_step", "rollback"]
  assert fitted.lr_scale == trained.lr_scale < 1
  same_weights(model, twin.model)


def test_nan_rows_in_x_are_dropped_counted_and_the_rest_trains(tmp_path):
  """Rows of x with a NaN are left out of their step (guard.bad_inputs=
  drop_rows), recorded, and the run ends finite with every epoch's loss."""
  x, y = regression_data(64)
  x[[3, 17, 40]] = np.nan
  model = regressor()
  result = safetrain.fit(
    model,
    x,
    y,
    batch_size=16,
    epochs=2,
    shuffle=False,
    workdir=str(tmp_path),
    config=keras_config(),
  )
  dropped = [r for r in result.incidents if r["action"] == "dropped_rows"]
  assert [r["kind"] for r in dropped] == ["nonfinite_inputs"] * len(dropped) and dropped
  assert (
    sum(r["dropped_rows"] for r in records(str(tmp_path), "metrics.jsonl") if "dropped_rows" in r)
    == 6
  )
  assert all(np.isfinite(w).all() for w in model.get_weights())
  assert len(result.history["loss"]) == 2 and np.isfinite(result.history["loss"]).all()


@pytest.mark.parametrize(
  "loss",
  [
    "sparse_categorical_crossentropy",
    keras.losses.SparseCategoricalCrossentropy(),
    keras.losses.sparse_categorical_crossentropy,
  ],
  ids=["name", "class", "function"],
)
def test_out_of_range_labels_of_a_compiled_sparse_loss_are_dropped_rows(tmp_path, loss):
  """Labels of -1 or num_classes (Keras fit: an InvalidArgumentError on the
  CPU, NaN on a GPU) are bad rows for a compiled sparse cross-entropy, as
  for a Trainer's config.loss: dropped, named, and the rest trains."""
  x, y = classification_data(96)
  y[[5, 40]] = 3  # num_classes
  y[70] = -1
  model = classifier()
  model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
  result = safetrain.fit(
    model,
    x,
    y,
    batch_size=32,
    epochs=2,
    shuffle=False,
    workdir=str(tmp_path),
    config=keras_config(),
  )
  bad = [r for r in result.incidents if r["kind"] == "bad_labels"]
  assert bad and {r["action"] for r in bad} == {"dropped_rows"}
  assert "class labels y outside [0, 3)" in bad[0]["diagnosis"]
  assert (result.step, result.stopped) == (6, "completed")
  dropped = [
    r["dropped_rows"] for r in records(str(tmp_path), "metrics.jsonl") if "dropped_rows" in r
  ]
  assert sum(dropped) == 2 * 3  # three bad rows, two epochs
  assert all(np.isfinite(w).all() for w in model.get_weights())


def test_labels_equal_to_ignore_class_are_not_bad_rows(tmp_path):
  """A sparse cross-entropy with ignore_class reads that value on purpose:
  its rows are no bad labels, and the run trains on them as Keras does."""
  x, y = classification_data(96)
  y[[5, 40, 70]] = -1
  model = classifier()
  model.compile(
    optimizer=keras.optimizers.Adam(1e-2),
    loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=-1),
  )
  result = safetrain.fit(
    model,
    x,
    y,
    batch_size=32,
    epochs=1,
    shuffle=False,
    workdir=str(tmp_path),
    config=keras_config(),
  )
  assert result.incidents == [] and result.step == 3
  assert np.isfinite(result.history["loss"]).all()


@pytest.mark.parametrize(
  "loss, target, what",
  [
    ("mse", "gaussian", "predicting the targets' mean"),
    (keras.losses.MeanAbsoluteError(), "gaussian", "predicting the targets' median"),
    (keras.losses.BinaryCrossentropy(from_logits=True), "binary", "predicting the positive rate"),
  ],
  ids=["mse-name", "mae-class", "bce-logits"],
)
def test_a_compiled_keras_loss_is_held_to_the_trivial_predictor(tmp_path, loss, target, what):
  """Targets drawn apart from the inputs: nothing to learn. A compiled keras
  loss of known closed form is held to the constant predictor's loss, as a
  Trainer's config.loss is (not to the initial weights', which any constant
  offset beats): not_learning, a rollback with the rate probe, then the
  abort (exit 3), never a success."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(512, 4)).astype("float32")
  if target == "gaussian":
    y = (5.0 + rng.normal(size=(512, 1))).astype("float32")
  else:
    y = (rng.random((512, 1)) < 0.3).astype("float32")
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
    [
      keras.Input((4,)),
      keras.layers.Dense(8, activation="relu"),
      keras.layers.Dense(1),
    ]
  )
  model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
  config = keras_config(**{"guard.learn_steps": 100, "train.steps_per_loop": 10})
  with pytest.raises(safetrain.DivergenceError, match="not_learning") as err:
    safetrain.fit(model, x, y, batch_size=32, epochs=40, workdir=str(tmp_path), config=config)
  assert what in err.value.diagnosis
  decided = [(r["kind"], r["action"]) for r in err.value.incidents if r["action"] != "skipped_step"]
  assert decided == [("not_learning", "rollback"), ("not_learning", "abort")], decided


class LogLoss(keras.losses.Loss):
  """A squared error that is NaN where y_true is 0 (log(0) * 0): a bad example."""

  def call(self, y_true, y_pred):
    return tf.reduce_mean(tf.math.log(y_true) * 0.0 + tf.square(y_true - y_pred), axis=-1)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum"])
def test_a_compiled_loss_drops_bad_examples_where_it_is_a_mean(tmp_path, reduction):
  """A compiled loss that reduces as a mean is computed per example, so the
  example whose loss is NaN is dropped and its batch trains; a "sum" loss
  is Keras's scalar: the batch is skipped whole until the row probe shows
  the failure bound to that row (recovery.scalar_rows), then the row is
  dropped inside the step."""
  x, y = regression_data(32)
  y = np.abs(y) + 1.0
  y[5] = 0.0  # log(0) * 0 = NaN for this one example
  model = regressor()
  loss = LogLoss(reduction=reduction)
  model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
  result = safetrain.fit(
    model,
    x,
    y,
    batch_size=8,
    epochs=2,
    shuffle=False,
    workdir=str(tmp_path),
    config=keras_config(**{"guard.preflight": "off"}),
  )
  actions = {r["action"] for r in result.incidents}
  if reduction == "sum":
    assert [r["action"] for r in result.incidents] == [
      "quarantined_batch",
      "row_losses",
      "dropped_examples",
    ]
    # Skipped whole in the first loop (twice: the 4 batches repeat within
    # it); the row probe at its end turns the remedy on; dropped after.
    assert result.quarantined == 2 and result.examples_dropped == 1
  else:
    # Two passes, each dropping the one example; every batch trains.
    assert actions == {"dropped_examples"} and result.examples_dropped == 2
  assert result.step == 8 and all(np.isfinite(w).all() for w in model.get_weights())


# --------------------------------------- class_weight for Trainer users


class Classifier(safetrain.Trainer):
  def build_model(self):
    return classifier()

  def build_train_dataset(self):
    x, y = classification_data()
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(self.config.train.batch_size)


def test_config_class_weight_trains_a_trainer_as_keras_class_weight(tmp_path):
  """config.class_weight on a Trainer subclass: the weights Keras fit's
  class_weight gives (a class not listed weighs 1)."""
  x, y = classification_data()
  weights = {1: 4.0, 2: 0.5}
  reference = classifier()
  reference.compile(keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
  reference.fit(x, y, batch_size=15, epochs=1, shuffle=False, class_weight=weights, verbose=0)
  config = keras_config(
    **{"loss": "sparse_categorical_crossentropy", "optimizer.name": "sgd", "train.batch_size": 15}
  )
  config.optimizer.learning_rate = 0.1
  config.train.steps = 6
  config.class_weight = weights
  trainer = Classifier(config, str(tmp_path))
  trainer.fit()
  same_weights(reference, trainer.model)


def test_config_class_weight_multiplies_a_datasets_sample_weight(tmp_path):
  """With (x, y, sample_weight) batches the class weight multiplies in
  (Keras refuses both together): the same weights as Keras given the
  product as sample_weight."""
  x, y = classification_data()
  sample = np.linspace(0.5, 2.0, len(x)).astype("float32")
  weights = {0: 2.0, 2: 3.0}
  product = sample * np.array([weights.get(int(c), 1.0) for c in y], "float32")
  reference = classifier()
  reference.compile(keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
  reference.fit(x, y, sample_weight=product, batch_size=30, shuffle=False, verbose=0)

  class Weighted(Classifier):
    def build_train_dataset(self):
      return tf.data.Dataset.from_tensor_slices((x, y, sample)).batch(30)

  config = keras_config(**{"loss": "sparse_categorical_crossentropy", "optimizer.name": "sgd"})
  config.optimizer.learning_rate = 0.1
  config.train.steps = 3
  config.class_weight = weights
  trainer = Weighted(config, str(tmp_path))
  trainer.fit()
  same_weights(reference, trainer.model)


@pytest.mark.parametrize(
  "value, shown",
  [({-1: 1.0}, "-1: 1.0"), ({0: float("nan")}, "0: nan"), ({"a": 2.0}, "'a': 2.0")],
)
def test_a_bad_class_weight_is_one_line_naming_the_field(tmp_path, value, shown):
  config = tiny_config()
  config.class_weight = value
  with pytest.raises(safetrain.ConfigError, match=r"config\.class_weight = .* is invalid") as e:
    safetrain.validate(config)
  assert shown in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"safetrain\.fit: class_weight=") as e:
    safetrain.fit(regressor(), *regression_data(8), class_weight=value, workdir=str(tmp_path))
  assert shown in str(e.value)


def test_class_weight_from_the_command_line(tmp_path, capsys):
  """--config.class_weight={...} is a flag like any other: a bad one is exit
  2 with one line before any training."""
  experiment = os.path.join(os.path.dirname(__file__), "..", "experiments", "classification.py")
  argv = ["safetrain", f"--config={experiment}:smoke", f"--workdir={tmp_path}"]
  code = cli.main_with_exit_code(argv + ["--config.class_weight={0: -3}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "config.class_weight = {0: -3} is invalid" in err[0]
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))


# ------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(steps=3, epochs=2), "pass steps .* or epochs, not both"),
    (dict(y=None), "has no targets"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
    (dict(shuffle="rows"), "shuffle must be True, False or 'batch'"),
    (dict(validation_split=1.5), r"validation_split must be in \(0, 1\)"),
    (dict(x=np.zeros((5, 4)), y=np.zeros((6, 1))), "the same number of rows"),
    (dict(config=keras_config(**{"distribute.strategy": "mirrored"})), "on its own device"),
  ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, kwargs, message):
  x, y = regression_data(8)
  args = dict(x=x, y=y, workdir=str(tmp_path))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    safetrain.fit(regressor(), **args)
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))


def test_dataset_arguments_follow_keras_rules(tmp_path):
  x, y = regression_data(8)
  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
  with pytest.raises(ValueError, match="with x a tf.data.Dataset, y must be None"):
    safetrain.fit(regressor(), dataset, y, workdir=str(tmp_path))
  with pytest.raises(ValueError, match="validation_split is only supported for arrays"):
    safetrain.fit(regressor(), dataset, validation_split=0.5, workdir=str(tmp_path))
  with pytest.raises(ValueError, match="infinite: pass steps_per_epoch"):
    safetrain.fit(regressor(), dataset.repeat(), workdir=str(tmp_path))
  with pytest.raises(ValueError, match=r"must yield \(x, y\)"):
    safetrain.fit(regressor(), dataset.map(lambda a, b: a), workdir=str(tmp_path))
