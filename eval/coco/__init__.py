"""COCO detection evaluation: pycocotools scoring (metric.py) and the mmdet 3.x glue (mmdet_adapter.py)."""
