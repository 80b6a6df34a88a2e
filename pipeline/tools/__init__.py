"""Tools around the pipeline, run as ``python -m pipeline.tools.<name>``: the demo dataset
generator, the COCO / Pascal VOC converters and the throughput benchmark."""
