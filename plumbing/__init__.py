"""Plumbing below everything else: all-or-nothing writes, checksummed downloads, dataset caches, leases (claims and data locks), progress bars, and every direct call into torch.cuda (gpu.py)."""
