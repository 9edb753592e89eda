"""Keras 3 example (torch backend): an MLP on scikit-learn's handwritten digits, watched by WeightWatcher.

    python examples/keras_example.py [--epochs 20] [--out ww-output/keras] [--no-wandb]

Runs on a CPU in well under a minute. The data ships inside scikit-learn (``load_digits``: 1,797
8x8 images, nothing downloaded); without scikit-learn a generated teacher-student task is used.
The callback analyses the layer spectra at the end of every epoch once half the training is done,
plus a final analysis, and writes into ``--out``:

* ``ww/report.html``: self-contained report (alpha over time, latest per-layer table, flags);
* ``ww/alpha_over_time.png``, ``ww/history.jsonl``, ``ww/history.csv``, ``ww/ww_state.json``
  (resume: run again with ``--resume``, which continues from the last epoch with
  ``fit(initial_epoch=...)`` and the same output folder);
* ``wandb/offline-run-*``: an offline W&B run (``wandb.init(mode="offline")``) with the Keras
  losses per epoch and the ``ww/*`` curves plotted against ``global_step``. Upload later with
  ``wandb sync``. (``wandb.integration.keras`` needs TensorFlow, so the losses are logged by a
  small ``LambdaCallback`` here.)
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")  # before the first `import keras`
os.environ.setdefault("WANDB_SILENT", "true")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from ww_callbacks.keras import WeightWatcherCallback  # noqa: E402


def load_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data / 16.0).astype("float32")
        y = digits.target.astype("int64")
        source = "scikit-learn load_digits (1,797 8x8 images, 10 classes)"
    except ImportError:
        x = rng.standard_normal((2000, 64)).astype("float32")
        y = np.tanh(x @ rng.standard_normal((64, 10))).argmax(1)
        source = "generated teacher-student data (scikit-learn not installed)"
    perm = rng.permutation(len(x))
    return x[perm], y[perm], source


def build_model() -> "keras.Model":
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(512, activation="relu", name="dense_0"),
        keras.layers.Dense(256, activation="relu", name="dense_1"),
        keras.layers.Dense(10, name="head"),
    ])
    model.compile(optimizer=keras.optimizers.AdamW(3e-3, weight_decay=1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="ww-output/keras", help="output folder")
    parser.add_argument("--no-wandb", action="store_true", help="skip the offline W&B run")
    parser.add_argument("--resume", action="store_true",
                        help="continue a previous run in --out (weights and history)")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    x, y, source = load_data()
    os.makedirs(args.out, exist_ok=True)
    out_dir = os.path.join(args.out, "ww")
    weights = os.path.join(args.out, "model.weights.h5")

    model = build_model()
    initial_epoch = 0
    if args.resume and os.path.exists(weights):
        model.load_weights(weights)
        import json

        from ww_callbacks.state import STATE_FILE

        with open(os.path.join(out_dir, STATE_FILE)) as fh:   # the final analysis: the last epoch
            initial_epoch = json.load(fh)["states"][-1]["started"][1] + 1

    callbacks = []
    run = None
    if not args.no_wandb:
        try:
            import wandb

            run = wandb.init(project="ww-callbacks-examples", name="keras-digits", mode="offline",
                             dir=args.out, config={"epochs": args.epochs})
            callbacks.append(keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: run.log({**(logs or {}), "epoch": epoch})))
        except ImportError:
            print("wandb is not installed: no W&B run (pip install wandb)")
    watcher = WeightWatcherCallback(start_fraction=0.5, every_n_epochs=1, output_dir=out_dir,
                                    log_fn=print)
    callbacks.append(watcher)
    print(f"data: {source}; training epochs {initial_epoch}..{args.epochs - 1} on CPU "
          f"(keras backend: {keras.config.backend()})")
    t0 = time.time()
    hist = model.fit(x, y, validation_split=0.2, epochs=args.epochs, initial_epoch=initial_epoch,
                     batch_size=64, verbose=0, callbacks=callbacks)
    model.save_weights(weights)
    if run is not None:
        run.finish()
    val_acc = hist.history.get("val_accuracy", [float("nan")])[-1]
    print(f"\ndone in {time.time() - t0:.1f} s; val accuracy {val_acc:.3f}")
    print(f"analyses at steps {watcher.history.steps}")
    print(f"report:  {os.path.abspath(os.path.join(out_dir, 'report.html'))}")
    print(f"history: {os.path.abspath(os.path.join(out_dir, 'history.csv'))}")
    runs = sorted(glob.glob(os.path.join(args.out, "wandb", "offline-run-*")), key=os.path.getmtime)
    if runs:
        print(f"W&B offline run: {os.path.abspath(runs[-1])}")
        print(f"upload it with:  wandb sync {os.path.abspath(runs[-1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
