"""Evaluation of CLIP models: zero-shot classification, retrieval, linear probe and kNN on frozen features.

Modules: `models` (load a model from a SPEC), `datasets` (dataset SPECs), `templates` (prompt sets), `features`
(batched encoding), `metrics`, `zeroshot`, `retrieval`, `linear_probe`, `knn`, `report` (JSON/CSV/markdown output).
The command-line doors are `eval/*.py`.
"""
