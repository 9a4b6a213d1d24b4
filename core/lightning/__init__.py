"""Lightning integration: recipe module and datamodule, callback, precision wrapper."""
