"""One module per export format, each registering one :class:`~rankwise.export.base.Format` in ``FORMATS``."""
