"""The tiny models, corpus and toy tasks that the demos and tests build offline."""
