"""Pure torch compression operations (no Lightning): masks, structured removal, and the rest.

Callbacks in :mod:`vlcompress.callbacks` are the Lightning glue over these functions; they
reach a model only through its :class:`~vlcompress.models.anatomy.Anatomy`.
"""
