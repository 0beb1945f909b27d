import hashlib
import json

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_mlops import data, lineage
from mnist_mlops.files import write_json
from mnist_mlops.paths import ProjectPaths


def test_prepared_splits_are_logged_as_the_run_inputs(tmp_path, mlflow_store):
    paths = ProjectPaths(tmp_path)
    rng = np.random.default_rng(0)
    sizes = {"train": 6, "val": 4}
    digests = {}
    for split, size in sizes.items():
        images = rng.integers(0, 256, (size, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size, dtype=np.uint8)
        data.save_split(paths.split(split), images, labels)
        digests[split] = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    write_json(paths.data_summary, {"sha256": digests})

    with mlflow.start_run() as run:
        lineage.log_splits(paths, {"train": "training", "val": "validation"})

    logged = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    found = {item.dataset.name: item for item in logged}
    assert sorted(found) == ["mnist-train", "mnist-val"]
    for split, context in (("train", "training"), ("val", "validation")):
        item = found[f"mnist-{split}"]
        tags = {tag.key: tag.value for tag in item.tags}
        assert tags == {"mlflow.data.context": context, "sha256": digests[split]}
        # MLflow keeps at most 36 characters of a digest: the sha256's beginning.
        assert item.dataset.digest == digests[split][:36]
        assert json.loads(item.dataset.source) == {"uri": str(paths.split(split))}
        assert json.loads(item.dataset.profile)["features_shape"] == [sizes[split], 28, 28]
