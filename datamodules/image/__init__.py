"""Images: COCO captions and WebDataset shards readers, the COCO and ImageFolder DataModules."""
