"""Where the examples come from: corpus files found, downloaded and read strictly
(read.py), then tokenized once into fixed-width features and cached (features.py).
data.py turns the features into batches."""
