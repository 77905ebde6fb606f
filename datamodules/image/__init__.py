"""Images: COCO captions, WebDataset shards, image-text pairs, classification sets: readers, DataModules."""
