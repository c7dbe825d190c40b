"""Merge methods, one module each, registered in :data:`rankwise.merging.methods.base.MERGE_METHODS`."""
