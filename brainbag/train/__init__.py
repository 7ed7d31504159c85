"""Training, evaluation and cross-validation of BagNet-3D weights from labelled data."""
