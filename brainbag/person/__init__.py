"""A person's recorded data and the clinical reading of a prediction: tables, gap, calibration."""
