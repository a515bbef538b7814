"""Dataset inputs: each run's training, validation and test data as MLflow datasets, so the UI's
Datasets column and the run page name the archive, its digest and the split."""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from urllib.parse import urlparse

from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

def _dataset_source(url: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if urlparse(url).scheme in ("http", "https"):
        return HTTPDatasetSource(url)
    with warnings.catch_warnings():  # "" and file:// both resolve to the local source: MLflow warns
        warnings.simplefilter("ignore")
        return resolve_dataset_source(url)


def dataset_input(context: str, url: str, md5: str, n_images: int, split_hash: str | None = None) -> DatasetInput:
    """One part of CIFAR-10 as an MLflow dataset input: name 'cifar10', source the archive's URL,
    a digest from what defines the images (the archive's MD5, and for the training and validation
    parts the split's hash and the part), context 'training' | 'validation' | 'test'. Nothing is
    hashed again: the MD5 is the one the download stage verified."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    defined_by = {"archive_md5": md5, "part": context}
    if split_hash is not None:
        defined_by["split_hash"] = split_hash
    digest = hashlib.sha256(json.dumps(defined_by, sort_keys=True).encode()).hexdigest()[:12]
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, 32, 32, 3), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    ds = MetaDataset(_dataset_source(url), name="cifar10", digest=digest, schema=schema).to_dict()
    profile = json.dumps({"num_images": n_images, **defined_by})
    entity = DatasetEntity(name=ds["name"], digest=ds["digest"], source_type=ds["source_type"],
                           source=ds["source"], schema=ds.get("schema"), profile=profile)
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def log_datasets(client: MlflowClient, run_id: str, inputs: list[DatasetInput]) -> None:
    """Idempotent: MLflow reuses a dataset (name, digest) and an input already on the run."""
    try:
        client.log_inputs(run_id, datasets=inputs)
    except Exception as e:  # lineage must never cost the training or its metrics
        print(f"warning: could not log the dataset inputs to MLflow ({type(e).__name__}: {e})", file=sys.stderr)

