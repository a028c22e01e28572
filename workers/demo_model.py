"""The demo model: a small CNN trained on synthetic shapes (``batchvision demo-model``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from batchvision.core.synthetic import CLASSES, dataset

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402 - TF's log level must be set before the import


def train_demo_model(
    out: Path, *, input_size: int = 48, n_train: int = 8000, epochs: int = 18, seed: int = 0
) -> float:
    """Train the demo CNN on synthetic shapes; save ``out`` (.keras) and its labels file.

    Returns the accuracy on a freshly generated held-out set (a different seed).
    """
    keras.utils.set_random_seed(seed)
    x, y = dataset(n_train, (input_size, input_size), seed=seed + 1)
    xt, yt = dataset(1200, (input_size, input_size), seed=seed + 2)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((input_size, input_size, 3)),
            layers.Rescaling(1 / 255.0),
            *_conv_block(24),
            layers.MaxPooling2D(),
            *_conv_block(48),
            layers.MaxPooling2D(),
            *_conv_block(64),
            layers.MaxPooling2D(),
            *_conv_block(96),
            layers.GlobalAveragePooling2D(),
            layers.Dense(64, activation="relu"),
            layers.Dense(len(CLASSES), activation="softmax"),
        ],
        name="batchvision_demo",
    )
    steps = epochs * -(-int(n_train * 0.9) // 64)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=2, validation_split=0.1)
    accuracy = float(model.evaluate(xt, yt, verbose=0)[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    out.with_name(out.stem + ".labels.txt").write_text("\n".join(CLASSES) + "\n")
    return accuracy


def _conv_block(filters: int) -> list[Any]:
    layers = keras.layers
    return [
        layers.Conv2D(filters, 3, padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.Activation("relu"),
    ]


# -- the second demo model: colours ----------------------------------------------------


def train_colour_model(
    out: Path, *, input_size: int = 32, n_train: int = 3000, epochs: int = 8, seed: int = 0
) -> float:
    """Train the colour demo CNN (six colours, :data:`~batchvision.core.synthetic.COLOURS`);
    save ``out`` (.keras) and its labels file. Seconds on a CPU. Returns the held-out accuracy."""
    from batchvision.core.synthetic import COLOUR_CLASSES, colour_dataset

    keras.utils.set_random_seed(seed)
    x, y = colour_dataset(n_train, (input_size, input_size), seed=seed + 1)
    xt, yt = colour_dataset(600, (input_size, input_size), seed=seed + 2)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((input_size, input_size, 3)),
            layers.Rescaling(1 / 255.0),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.GlobalMaxPooling2D(),
            layers.Dense(32, activation="relu"),
            layers.Dense(len(COLOUR_CLASSES), activation="softmax"),
        ],
        name="batchvision_colours",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=2, validation_split=0.1)
    accuracy = float(model.evaluate(xt, yt, verbose=0)[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    out.with_name(out.stem + ".labels.txt").write_text("\n".join(COLOUR_CLASSES) + "\n")
    return accuracy
