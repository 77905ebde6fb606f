"""WebDataset tar shards of image-text pairs: written, listed, read and streamed (docs/data.md)."""
