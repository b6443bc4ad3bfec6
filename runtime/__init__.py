"""The machinery the BYOL trial stands on: the command lines (``cli``), launching (``launch``),
settings (``settings``), the data pipeline and its sampling (``loaders``, ``sampling``,
``jpeg_decode``, ``preflight``, ``gcs``, ``gcs_client``), linear evaluation and kNN
(``linear_eval``, ``classifier``, ``knn``, ``feature_probes``), checkpoints and faults
(``checkpoints``, ``faults``, ``nonfinite``, ``stops``), distributed helpers (``sync_batchnorm``,
``replicas``), speed (``performance``), and reporting (``plots``, ``progress``).

Nothing here imports the entry files (``model_def.py``, ``evaluate_result.py``,
``generate_blob_list.py``): the trial is handed to :func:`launch.main` as a factory.
See docs/architecture.md for the layers and what each may import.
"""
