"""Offline dataset preparation: `python -m data_pipelines.prepare --dataset=...` (see docs/data.md).

builders: the TFDS builders (gta5, synthia, cityscapes, image_folder, synthetic_city);
convert: per-file conversion and the report; labels: raw id -> train id tables;
synthetic_city: the procedural domain pair;
bench: input pipeline throughput at GTA5 size.
"""
