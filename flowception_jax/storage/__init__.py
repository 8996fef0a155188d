"""Files the package writes: atomic writes on local disks and object stores, GIFs and PNGs."""
