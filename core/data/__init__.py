"""Built-in datasets: documents, byte tokens, training windows, samplers."""
