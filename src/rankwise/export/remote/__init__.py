"""The modeling file shipped inside a remote-code export (:mod:`.modeling_rankwise`: torch and
transformers only, never rankwise) -- read as text by :mod:`rankwise.export.formats.remote_code`."""
