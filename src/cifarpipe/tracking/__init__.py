"""Everything MLflow, one module per concept: the store, provenance, the run record, datasets,
system metrics, the registry, the model, TensorBoard files, reading runs back, the journal of
pending deliveries, one run's logging, and the training job's run."""
