"""Data: the archive (download, verification, arrays), the seeded split, the batches."""
