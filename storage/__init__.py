"""File plumbing below everything that reads or writes: all-or-nothing writes, checksummed downloads, dataset caches, leases (claims and data locks)."""
