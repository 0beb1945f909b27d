"""Which data a run saw: the prepared splits as the run's MLflow datasets (MLflow 3's run inputs).

Each split is logged as dataset `mnist-<split>` with its source (the split file, relative to the
project, as DVC tracks it) and the digest prepare wrote into summary.json, so runs that saw the
same data show the same digest, and `search_runs` can find them by it.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlflow
from mlflow.data.sources import LocalArtifactDatasetSource

from mnist_mlops.data import load_split
from mnist_mlops.files import read_json
from mnist_mlops.paths import ProjectPaths

# MLflow refuses dataset digests longer than this; the whole sha256 goes in the input's tags.
MAX_DIGEST = 36
SHA256_TAG = "sha256"


def dataset_name(split: str) -> str:
    return f"mnist-{split}"


def log_splits(paths: ProjectPaths, contexts: Mapping[str, str]) -> None:
    """Log prepared splits as inputs of the active run: {split: context}, for example
    {"train": "training", "val": "validation"}."""
    digests = read_json(paths.require(paths.data_summary))["sha256"]
    datasets = []
    for split in contexts:
        path = paths.require(paths.split(split))
        images, labels = load_split(path)
        datasets.append(
            mlflow.data.from_numpy(
                images,
                targets=labels,
                source=LocalArtifactDatasetSource(str(path)),
                name=dataset_name(split),
                digest=digests[split][:MAX_DIGEST],
            )
        )
    mlflow.log_inputs(
        datasets,
        contexts=list(contexts.values()),
        tags_list=[{SHA256_TAG: digests[split]} for split in contexts],
    )
