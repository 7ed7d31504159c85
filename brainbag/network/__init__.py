"""The BagNet-3D and its map inference: a conformed volume in, age and sex maps out."""
