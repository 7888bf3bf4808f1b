"""Data: datalists (``datalist``), reading and writing every image format (``images``), the transform chains
(``transforms``), ``check-data`` (``checks``) and public datasets as datalists (``importers``)."""
